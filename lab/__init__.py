"""The lab: a small real teacher (Fashion-MNIST latent diffusion), its evaluator and the benchmark."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_DIR = ASSETS / "teacher"
CLASSIFIER_PATH = ASSETS / "classifier.safetensors"
SHORTCUT_PATH = ASSETS / "shortcut.safetensors"
STUDENTS_DIR = ASSETS / "students"


class LabInputMissing(FileNotFoundError):
    """What a lab command reads is not there (the Fashion-MNIST files, the trained teacher): one line says what to
    install or run, no traceback."""
