"""Every registered method, tiny, through the command line: run by tests/test_two_processes.py under
`accelerate launch --multi_gpu --num_processes 2` on the CPU. Arguments: the teacher folder, the output folder."""

import sys
from pathlib import Path

from direct_distill.training import sfd
from direct_distill.training.cli import main
from direct_distill.training.registry import METHODS

sfd.POOL_SHARD = 2  # SFD's pool of 3 draws in two files, one computed by each process

teacher, root = Path(sys.argv[1]), Path(sys.argv[2])
common = ["--teacher", str(teacher), "--prompts", str(root / "prompts.txt"), "--batch-size", "1",
          "--checkpoint-every", "1"]
lora = ["--rank", "2"]
runs = {
    "shortcut": ["--trajectories", "4", "--shard-size", "1", "--sample-batch-size", "1", "--teacher-steps", "4",
                 "--capture-band", "200", "260", "--stage1-steps", "2", "--stage2-steps", "1", "--holdout", "0.25"],
    "progressive": [*lora, "--latents", str(root / "latents.safetensors"), "--teacher-steps", "2",
                    "--student-steps", "1", "--steps-per-round", "2", "--warmup-steps", "0"],
    "sfd": [*lora, "--nfe", "1", "--default-nfe", "1", "--steps", "2", "--teacher-substeps", "1", "--pool", "3",
            "--warmup-steps", "0"],
    "gdd": [*lora, "--latents", str(root / "latents.safetensors"), "--steps", "2", "--r1-every", "1"],
    "disback": [*lora, "--degradation-steps", "1", "--path-checkpoints", "1", "--steps-per-node", "1", "--steps", "2"],
}
assert sorted(runs) == sorted(METHODS), "a registered method is missing here"
for method, args in runs.items():
    for _ in range(2):  # the second run resumes the finished one
        assert main([method, *common, *args, "--out", str(root / f"{method}.safetensors")]) == 0
