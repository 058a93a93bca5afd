"""GPU slots: concurrent jobs never share a device index (fake devices, real processes)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pgolf.gpuslots import claim, try_claim

# records the devices it was given and when it held them
PROBE = ("import json, os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
         "open(sys.argv[1], 'a').write(json.dumps({'devices': "
         "os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': t0, 'end': time.time()}) + '\\n')")


def slot_cmd(gpus, lock_dir, out, *, devices=4, hold=0.4):
    return [sys.executable, "-m", "pgolf.gpuslots", "--gpus", str(gpus), "--devices",
            str(devices), "--lock-dir", str(lock_dir), "--", sys.executable, "-c", PROBE,
            str(out), str(hold)]


def env_without(*names):
    return {k: v for k, v in os.environ.items() if k not in names}


def test_concurrent_jobs_never_share_a_device(tmp_path):
    out = tmp_path / "held.jsonl"
    wants = [1, 2, 1, 3, 1, 2, 1, 1]  # 12 device-jobs on 4 devices: some must wait
    env = env_without("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
    jobs = [subprocess.Popen(slot_cmd(n, tmp_path / "locks", out), env=env) for n in wants]
    assert all(job.wait(timeout=60) == 0 for job in jobs)
    held = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(len(h["devices"].split(",")) for h in held) == sorted(wants)
    for i, a in enumerate(held):
        assert set(a["devices"].split(",")) <= {"0", "1", "2", "3"}
        for b in held[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            if overlap:
                assert not set(a["devices"].split(",")) & set(b["devices"].split(","))
    # 12 device-jobs of 0.4 s on 4 devices cannot all overlap: the waits really happened
    assert max(h["end"] for h in held) - min(h["start"] for h in held) > 0.8


def test_cpu_jobs_slurm_jobs_and_gpu_less_machines_are_left_alone(tmp_path):
    out = tmp_path / "held.jsonl"
    env = env_without("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
    subprocess.run(slot_cmd(0, tmp_path / "locks", out, hold=0), env=env, check=True)
    slurm = {**env, "SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "5"}  # set by SLURM itself
    subprocess.run(slot_cmd(2, tmp_path / "locks", out, hold=0), env=slurm, check=True)
    no_gpus = slot_cmd(1, tmp_path / "locks", out, devices=0, hold=0)  # device: auto on a CPU box
    subprocess.run(no_gpus, env=env, check=True)
    assert [json.loads(line)["devices"] for line in out.read_text().splitlines()] == [
        None, "5", None]
    assert not (tmp_path / "locks").exists()  # nothing was claimed


def test_a_user_restriction_is_the_pool(tmp_path):
    out = tmp_path / "held.jsonl"
    env = {**env_without("SLURM_JOB_ID"), "CUDA_VISIBLE_DEVICES": "2,5"}
    jobs = [subprocess.Popen(slot_cmd(1, tmp_path / "locks", out), env=env) for _ in range(2)]
    assert all(job.wait(timeout=30) == 0 for job in jobs)
    assert sorted(json.loads(line)["devices"] for line in out.read_text().splitlines()) == [
        "2", "5"]
    too_many = subprocess.run(slot_cmd(3, tmp_path / "locks", out), env=env,
                              capture_output=True, text=True)
    assert too_many.returncode == 1 and "asks for 3 GPU(s)" in too_many.stderr


def test_a_killed_job_releases_its_devices(tmp_path):
    env = env_without("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
    job = subprocess.Popen(slot_cmd(2, tmp_path / "locks", tmp_path / "o", devices=2, hold=30),
                           env=env)
    for _ in range(200):  # until it holds both devices
        probe = try_claim(1, ["0", "1"], tmp_path / "locks")
        if probe is None:
            break
        for fd in probe[1]:  # a probe that got a device lets it go at once
            os.close(fd)
        time.sleep(0.05)
    assert try_claim(1, ["0", "1"], tmp_path / "locks") is None
    job.send_signal(signal.SIGKILL)
    job.wait()
    ids, _ = claim(2, pool=["0", "1"], lock_dir=tmp_path / "locks", timeout=5)
    assert ids == ["0", "1"]
    with pytest.raises(TimeoutError):
        claim(1, pool=["0", "1"], lock_dir=tmp_path / "locks", timeout=0.3)


def test_script_jobs_hold_distinct_devices_in_process(tmp_path):
    # what a script rule does (pgolf.stage.claim_gpus): hold, then keep working in this process
    script = ("import os, sys, time; from pgolf.gpuslots import hold; ids = hold(1); "
              "print(os.environ['CUDA_VISIBLE_DEVICES'], ','.join(ids), flush=True); "
              "time.sleep(float(sys.argv[1]))")
    env = {**env_without("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID"), "PGOLF_GPU_DEVICES": "2",
           "PGOLF_GPU_LOCKS": str(tmp_path / "locks")}
    first = subprocess.Popen([sys.executable, "-c", script, "5"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert first.stdout.readline().split() == ["0", "0"]  # holds device 0 for 5 s
    second = subprocess.run([sys.executable, "-c", script, "0"], env=env, text=True,
                            capture_output=True, check=True)
    assert second.stdout.split() == ["1", "1"]
    assert "pgolf.gpuslots: this job holds GPU 1" in second.stderr  # named in the job's log
    first.kill()
    first.wait()


def test_a_bad_device_count_is_named(tmp_path):
    env = {**env_without("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID"), "PGOLF_GPU_DEVICES": "two"}
    cmd = [sys.executable, "-m", "pgolf.gpuslots", "--gpus", "1", "--lock-dir",
           str(tmp_path), "--", sys.executable, "-c", "pass"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "PGOLF_GPU_DEVICES = 'two'" in result.stderr
