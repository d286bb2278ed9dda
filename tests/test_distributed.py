"""Sharded sampling with torchrun: two CPU ranks give the single-process .npz, and a killed run resumes."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

FLAGS = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--num_heads", "2",
         "--attention_resolutions", "16", "--channel_mult", "1,2", "--learn_sigma", "True",
         "--resblock_updown", "True", "--use_scale_shift_norm", "True"]
RUN = ["--model_path", "tests/fixtures/adm32.pt", *FLAGS, "--timestep_respacing", "4", "--num_samples", "5",
       "--batch_size", "2", "--seed", "11", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out_dir, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "explore.distributed", "sample", *RUN, "--out_dir", str(out_dir)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def load(out_dir):
    with np.load(out_dir / "samples_5x32x32x3.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_two_ranks_equal_one_process_and_resume(tmp_path):
    single = subprocess.run([sys.executable, "-m", "explore", "sample", *RUN, "--out_dir", str(tmp_path / "one")],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    sharded = torchrun(tmp_path / "two")
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    assert one.keys() == two.keys() == {"arr_0"}
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    shards = sorted((tmp_path / "two" / "shards").glob("chunk_*.npz"))
    assert len(shards) == 3  # 5 images in chunks of 2

    # a run killed after some chunks: remove one chunk and the merged file, run again
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:2]}
    shards[2].unlink()
    (tmp_path / "two" / "samples_5x32x32x3.npz").unlink()
    resumed = torchrun(tmp_path / "two")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "were already on disk" in resumed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards[:2]} == kept  # finished chunks were not redone
    np.testing.assert_array_equal(load(tmp_path / "two")["arr_0"], one["arr_0"])
