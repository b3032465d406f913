"""Checks the built GPU image (deploy/Dockerfile, ENGINE=gpu) on a machine without a GPU, and writes what it
found as a record: docs/records/gpu-image-<date>.json.

  python bench/gpu_image/check.py [--image rpo-rl:latest] [--build [--base IMAGE]] [--build-seconds S]
                                  [--model DIR] [--out FILE]

--build builds the image first (`docker build --network host`, the legacy builder, ENGINE=gpu, BASE as
given), timing it; --build-seconds gives the time of a build made the same way beforehand. In the image,
with no GPU: torch, vLLM, DeepSpeed, transformers and PEFT import, and their versions with Python's,
CUDA's, cuDNN's and NCCL's; `rpo --version`; DeepSpeed's op report (`ds_report`); `rpo serve rollout` on a
model (--model, mounted read-only; default the tiny warm model of this checkout) ends with one line
naming the missing GPU, exit 2, no traceback, both as compose runs it (GPU claims on) and as a bare
`docker run`. Then the image's size and layers (`docker history`), and the CUDA-family libraries found
more than once in it (measure.py's names: vendoring hashes and versions dropped), each copy with the
package that brought it; a copy outside the venv would be of the Dockerfile's making. One line per check;
exit 1 if one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from measure import lib_name  # noqa: E402

VERSIONS = """
import json, platform, importlib.metadata as md
import torch, vllm, deepspeed, transformers, peft
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as exc:
    nccl = f"unknown ({exc})"
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(), "nccl": nccl, "vllm": vllm.__version__,
    "deepspeed": deepspeed.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    "nvidia_nccl_wheel": next((d.version for d in md.distributions() if d.metadata["Name"].startswith("nvidia-nccl")), None),
    "cuda_available": torch.cuda.is_available(),
}))
"""
FIND_LIBS = "find / -xdev \\( -name '*.so' -o -name '*.so.*' \\) -type f -printf '%s %p\\n' 2>/dev/null"
SITE = re.compile(r"site-packages/([^/]+)/")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Failed(Exception):
    pass


def docker(*args: str, timeout: float = 600, ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    try:
        # the legacy builder, as scripts/compose_smoke.sh builds (Docker 20.10's default; no buildx needed)
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Failed(f"`docker {' '.join(args[:4])} ...` took over {timeout:.0f} s") from None
    if done.returncode not in ok_codes:
        raise Failed(f"`docker {' '.join(args[:5])}` exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done


def in_image(image: str, entrypoint: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return docker("run", "--rm", "--network", "none", "--entrypoint", entrypoint, image, *args, **kw)


def duplicated_libraries(image: str) -> list[dict]:
    out = in_image(image, "sh", "-c", FIND_LIBS, timeout=900, ok_codes=(0, 1)).stdout
    libs: dict[str, list[dict]] = defaultdict(list)
    for row in out.splitlines():
        size, _, path = row.partition(" ")
        lib = lib_name(path)
        if lib:
            pkg = SITE.search(path)
            origin = pkg.group(1) if pkg else "outside the venv (the Dockerfile's or the base's)"
            libs[lib].append({"path": path, "bytes": int(size), "from": origin})
    dups = []
    for lib, copies in sorted(libs.items()):
        if len(copies) > 1:
            extra = sum(c["bytes"] for c in copies) - max(c["bytes"] for c in copies)
            ours = any(not c["path"].startswith("/opt/venv/") for c in copies)
            dups.append({"library": lib, "copies": copies, "extra_bytes": extra, "of_our_making": ours})
    return sorted(dups, key=lambda d: -d["extra_bytes"])


def serve_without_gpu(image: str, model: Path, compose_like: bool) -> str:
    env = ["-e", "RPO_GPUS__CLAIM_DIR=/run/rpo-gpus"] if compose_like else []
    done = docker(
        "run", "--rm", "--network", "none", *env, "-v", f"{model}:/models/policy:ro", image,
        "serve", "rollout", "--set", "model.path=/models/policy", "--port", "8200",
        timeout=600, ok_codes=(0, 1, 2, 3),
    )  # fmt: skip
    err = done.stderr.strip()
    lines = [x for x in err.splitlines() if x.strip()]
    if done.returncode != 2 or "Traceback" in err or len(lines) != 1 or "GPU" not in lines[-1]:
        tail = "\n".join(lines[-8:])
        raise Failed(f"exit {done.returncode}, {len(lines)} line(s) on stderr, last ones:\n{tail}")
    return lines[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", default="rpo-rl:latest")
    parser.add_argument("--build", action="store_true", help="build the image first, timing it")
    parser.add_argument("--base", default="ubuntu:24.04", help="the BASE build argument (with --build)")
    parser.add_argument("--build-seconds", type=float, default=None, help="a build timed beforehand")
    parser.add_argument("--build-note", default=None, help="how that build was made (kept in the record)")
    parser.add_argument("--model", type=Path, default=None, help="a model directory for `rpo serve rollout`")
    parser.add_argument("--out", type=Path, default=None, help="the record (default: print it)")
    args = parser.parse_args()
    record: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/gpu_image/check.py " + " ".join(sys.argv[1:]),
        "image": args.image,
        "machine": {"cpus": _cpus(), "gpu": None, "arch": platform.machine(), "docker": _docker_version()},
        "build_seconds": args.build_seconds,
        "build_note": args.build_note,
        "checks": [],
    }
    failed = []

    def check(name: str, fn) -> None:
        t0 = time.monotonic()
        try:
            detail = fn()
            status = "ok"
        except Failed as exc:
            detail, status = str(exc), "fail"
            failed.append(name)
        record["checks"].append({"check": name, "status": status, "detail": detail})
        print(
            f"{status:<5} {name} ({time.monotonic() - t0:.0f} s): {str(detail).splitlines()[0][:200]}",
            flush=True,
        )

    if args.build:

        def build() -> str:
            t0 = time.monotonic()
            docker(
                "build", "--network", "host", "-f", "deploy/Dockerfile", "--build-arg", "ENGINE=gpu",
                "--build-arg", f"BASE={args.base}", "-t", args.image, str(REPO), timeout=7200,
            )  # fmt: skip
            record["build_seconds"] = round(time.monotonic() - t0)
            return f"{record['build_seconds']} s"

        check("build", build)

    def versions() -> str:
        record["versions"] = json.loads(
            in_image(args.image, "python", "-c", VERSIONS).stdout.strip().splitlines()[-1]
        )
        return ", ".join(f"{k} {v}" for k, v in record["versions"].items())

    check("imports and versions", versions)
    check("rpo --version", lambda: in_image(args.image, "rpo", "--version").stdout.strip())

    def ds_report() -> str:
        out = ANSI.sub("", in_image(args.image, "ds_report", timeout=300).stdout)
        record["ds_report"] = [
            x.rstrip() for x in out.splitlines() if x.strip() and not set(x.strip()) <= {"-"}
        ]
        ops = [re.match(r"(\w+) \.+ \[(\w+)\] \.+ \[(\w+)\]", x) for x in record["ds_report"]]
        ops = [m.groups() for m in ops if m]
        record["ds_ops"] = {name: {"installed": inst, "compatible": comp} for name, inst, comp in ops}
        if not ops:
            raise Failed("ds_report listed no op")
        compatible = [n for n, _, c in ops if c == "OKAY"]
        built = [n for n, i, _ in ops if i == "YES"]
        return (
            f"{len(ops)} ops: {len(built)} prebuilt, {len(compatible)} can be JIT-compiled "
            f"({', '.join(n for n, _, c in ops if c != 'OKAY') or 'all'} cannot)"
        )

    check("ds_report", ds_report)
    model = args.model or _tiny_model()
    for compose_like in (True, False):
        name = "rpo serve rollout, no GPU" + (
            " (as compose runs it)" if compose_like else " (bare docker run)"
        )
        check(name, lambda c=compose_like: serve_without_gpu(args.image, model, c))

    def size() -> str:
        record["image_bytes"] = int(docker("image", "inspect", "-f", "{{.Size}}", args.image).stdout)
        rows = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", args.image).stdout
        record["layers"] = [
            {"size": s, "created_by": re.sub(r"\s+", " ", c)[:160]}
            for s, c in (r.split("\t", 1) for r in rows.splitlines())
            if s not in ("0B", "0")
        ]
        return f"{record['image_bytes'] / 1e9:.2f} GB in {len(record['layers'])} non-empty layers"

    check("size and layers", size)

    def dups() -> str:
        record["duplicated_cuda_libraries"] = found = duplicated_libraries(args.image)
        ours = [d["library"] for d in found if d["of_our_making"]]
        record["duplicates_of_our_making"] = ours
        extra = sum(d["extra_bytes"] for d in found)
        if ours:
            raise Failed(f"copies outside the venv: {', '.join(ours)}")
        return f"{len(found)} libraries in more than one copy, {extra / 1e6:.0f} MB beyond one each, none of ours"

    check("duplicated CUDA libraries", dups)
    record["failed"] = failed
    text = json.dumps(record, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"record: {args.out}")
    return 1 if failed else 0


def _tiny_model() -> Path:
    sys.path.insert(0, str(REPO))
    from services.models.model_path import resolve_model_path  # noqa: PLC0415

    return Path(resolve_model_path("builtin:tiny-warm"))


def _cpus() -> str:
    try:
        name = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return f"{len(os.sched_getaffinity(0))} x {name.split(':', 1)[1].strip()}"
    except (OSError, StopIteration):
        return "unknown"


def _docker_version() -> str:
    try:
        return docker("version", "-f", "{{.Server.Version}}", timeout=30).stdout.strip()
    except Failed:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
