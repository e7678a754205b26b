"""Every method in two processes on a CPU (`accelerate launch --multi_gpu --num_processes 2`): the processes join
(one run, gradients averaged, the shortcut's capture shared), and a re-run resumes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from direct_distill.models import load_shortcut
from direct_distill.models.io import read_safetensors
from direct_distill.models.student_file import read_student
from direct_distill.training.data import write_latents_file
from direct_distill.training.registry import METHODS

SCRIPT = Path(__file__).with_name("distill_in_two_processes.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_method_runs_and_resumes_in_two_processes_on_a_cpu(tiny_sd_pipeline, tmp_path):
    tiny_sd_pipeline.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("bag\ncoat\n")
    write_latents_file(tmp_path / "latents.safetensors", torch.randn(2, 4, 16, 16, generator=torch.Generator()
                                                                     .manual_seed(0)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path / "teacher"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    for method in METHODS:
        path = tmp_path / f"{method}.safetensors"
        extra = load_shortcut(path).metadata["extra"] if method == "shortcut" else read_student(path)[1].extra
        assert extra["processes"] == 2, method
    # The capture's four shards were shared out, and one process printed each result, twice (run, then resumed).
    assert len(list((tmp_path / "shortcut.work" / "trajectories" / "steps4").glob("shard-*.safetensors"))) == 4
    assert done.stdout.count("SFD student (NFE 1) written to") == 2
    pool = read_student(tmp_path / "sfd.safetensors")[1].extra["teacher_pool"]
    files = sorted((tmp_path / "sfd.work" / "teacher_pool").iterdir())
    assert pool["draws"] == 3 and [p.name for p in files] == ["pool-00000.safetensors", "pool-00001.safetensors"]
    # one file each, side by side: the pool's wall-clock is the longer of the two, not their sum
    seconds = [float(read_safetensors(p)[1]["seconds"]) for p in files]
    assert pool["seconds"] == round(max(seconds), 1)


def test_a_pools_wall_clock_is_its_busiest_processs_files():
    from direct_distill.training.sfd import pool_seconds

    assert pool_seconds([1.0, 2.0, 3.0], 2) == 4.0  # process 0 computed files 0 and 2, process 1 file 1
    assert pool_seconds([1.0, 2.0, 3.0], 1) == 6.0
