"""A stand-in `nvidia-smi` for machines without GPUs (this one, the test cluster's nodes).

`install(directory, ...)` writes `directory/nvidia-smi` (a Python script run by this
interpreter) and `directory/gpus.json` (what it reports). Put the directory first on a
node's PATH (`setup: export PATH=DIR:$PATH`, or `env: {PATH: ...}`) and the node agent's
probe finds it. It answers the three questions the probe asks, in real nvidia-smi's
formats:

  nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits
  nvidia-smi --query-compute-apps=FIELDS --format=csv,noheader,nounits
  nvidia-smi -q [-d COMPUTE]            (the header: driver and CUDA version)

With `fail=` it prints that line and exits 9, as nvidia-smi does without a driver.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = r'''
import json, os, sys

data = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpus.json")))
args = sys.argv[1:]
if data.get("fail"):
    print(data["fail"])
    sys.exit(9)


def query(prefix):
    for a in args:
        if a.startswith(prefix):
            return a[len(prefix):].split(",")
    return None


gpu_fields = query("--query-gpu=")
app_fields = query("--query-compute-apps=")
if gpu_fields is not None:
    for i, g in enumerate(data["gpus"]):
        values = {"index": i, "uuid": "GPU-fake-%d" % i, "name": g.get("name", "NVIDIA H100 80GB HBM3"),
                  "memory.total": g.get("total", 81559), "memory.used": g.get("used", 0),
                  "driver_version": data.get("driver", "550.54.15")}
        print(", ".join(str(values.get(f, "[N/A]")) for f in gpu_fields))
elif app_fields is not None:
    for p in data.get("processes", []):
        values = {"gpu_uuid": "GPU-fake-%d" % p["gpu"], "pid": p["pid"], "used_memory": p["memory"],
                  "process_name": p.get("name", "python")}
        print(", ".join(str(values.get(f, "[N/A]")) for f in app_fields))
elif "-q" in args:
    print("")
    print("==============NVSMI LOG==============")
    print("")
    print("Timestamp                                 : Thu Jan  1 00:00:00 2026")
    print("Driver Version                            : %s" % data.get("driver", "550.54.15"))
    print("CUDA Version                              : %s" % data.get("cuda", "12.4"))
    print("")
    print("Attached GPUs                             : %d" % len(data["gpus"]))
    for i, _ in enumerate(data["gpus"]):
        print("GPU 00000000:%02X:00.0" % (0x18 + i))
        print("    Compute Mode                          : Default")
else:
    print("fake nvidia-smi: unexpected arguments %r" % (args,), file=sys.stderr)
    sys.exit(2)
'''


def install(directory: Path, gpus: int | list[dict] = 0, *, processes: list[dict] | None = None,
            driver: str = "550.54.15", cuda: str = "12.4", name: str = "NVIDIA H100 80GB HBM3",
            fail: str | None = None) -> Path:
    """Write a fake nvidia-smi reporting `gpus` (a count, or one dict per GPU with
    name/total/used in MiB) and `processes` ({gpu, pid, memory, name}); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    listed = gpus if isinstance(gpus, list) else [{"name": name} for _ in range(gpus)]
    data = {"gpus": listed, "processes": processes or [], "driver": driver, "cuda": cuda}
    if fail:
        data["fail"] = fail
    (directory / "gpus.json").write_text(json.dumps(data))
    smi = directory / "nvidia-smi"
    smi.write_text(f"#!{sys.executable}\n" + SCRIPT)
    smi.chmod(0o755)
    return directory
