"""The measurements behind estimate.sh: the size of deploy/Dockerfile's ENGINE=gpu image, without building it.

Each subcommand works in the current directory (estimate.sh runs it in its work directory), prints a short
report and writes the figures as <subcommand>.json beside it; `summary` merges those into summary.json.

  sizes REPORT     compressed size of every wheel in a `pip install --dry-run --report` (HTTP HEAD)
  unpacked         what the wheels hold once unpacked (the sum of their members)
  dups             CUDA-family shared libraries that more than one wheel (or one wheel twice) brings
  installed VENV   apparent size of an installed venv (what a layer tars), and per distribution
  apt CLOSURE      Installed-Size of the apt packages that ubuntu:24.04 does not already have
  summary          the table estimate.sh ends with
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASE_LIST = HERE / "ubuntu-24.04-base.txt"
# `docker image ls` size of ubuntu:24.04 (amd64): the base every layer of the image sits on.
UBUNTU_BASE_BYTES = 78_100_000
HEAD_TIMEOUT_S = 60
GB = 1e9

# Shared libraries of the CUDA toolkit, cuDNN, NCCL and friends: the large files that wheels tend to repeat.
CUDA_LIB = re.compile(
    r"^lib(cud|cublas|nccl|cufft|cusparse|cusolver|curand|nvrtc|nvjitlink|cupti|nvshmem|nvtoolsext|cufile"
    r"|nvvm|nvjpeg|npp|nvblas|nvfatbin|nvptxcompiler)",
    re.I,
)
# auditwheel renames the libraries it vendors: libcudart-c64a25f3.so.12, libcudart.faf08d9a.so.13.
VENDOR_HASH = re.compile(r"[-.][0-9a-f]{8}$")


def ca_file() -> str | None:
    """The CA bundle the caller chose (same variables as estimate.sh), else None for the system default."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def write_json(name: str, data: dict[str, Any]) -> None:
    Path(name).write_text(json.dumps(data, indent=2) + "\n")


def read_json(name: str) -> dict[str, Any]:
    return json.loads(Path(name).read_text())


def gb(n: float) -> str:
    return f"{n / GB:.3f} GB"


def wheel_label(path: Path) -> str:
    """`name-version` from a wheel's file name."""
    return "-".join(path.name.split("-")[:2])


def current_wheels(tsv: Path = Path("wheels.tsv")) -> list[Path]:
    """The wheels of this resolution: those wheels.tsv names (wheels/ may hold older ones), plus built/."""
    rows = [line.split("\t") for line in tsv.read_text().splitlines() if line]
    paths = [Path("wheels") / r[4] for r in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"measure: {len(missing)} wheels not downloaded, e.g. {missing[0]}")
    return paths + sorted(Path("built").glob("*.whl"))


# ---- sizes -------------------------------------------------------------------------------------------------


def head_size(url: str, ctx: ssl.SSLContext) -> int:
    """Content-Length by HEAD: the download size without downloading."""
    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, context=ctx, timeout=HEAD_TIMEOUT_S) as r:
        length = r.headers.get("Content-Length")
    if length is None:
        raise RuntimeError(f"no Content-Length for {url}")
    return int(length)


def cmd_sizes(args: argparse.Namespace) -> None:
    """Writes wheels.tsv (name, version, bytes, url, file name, sha256) for the download step."""
    report = json.loads(Path(args.report).read_text())
    ctx = ssl.create_default_context(cafile=ca_file())
    items = report["install"]
    urls = [it["download_info"]["url"] for it in items]
    with cf.ThreadPoolExecutor(16) as ex:
        sizes = list(ex.map(lambda u: head_size(u, ctx), urls))
    rows = []
    for it, url, size in zip(items, urls, sizes, strict=True):
        name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[1])
        sha = it["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256", "")
        rows.append((it["metadata"]["name"], it["metadata"]["version"], size, url, name, sha))
    rows.sort(key=lambda r: -r[2])
    with open("wheels.tsv", "w") as f:
        for row in rows:
            f.write("\t".join(map(str, row)) + "\n")
    total = sum(r[2] for r in rows)
    print(f"{len(rows)} wheels, compressed total {gb(total)} ({total / 2**30:.3f} GiB)")
    for name, ver, size, _, fname, _ in rows[:10]:
        print(f"{size / 1e6:10.1f} MB  {name}=={ver}  {fname}")
    write_json("sizes.json", {"wheels": len(rows), "compressed_bytes": total})


# ---- unpacked ----------------------------------------------------------------------------------------------


def cmd_unpacked(args: argparse.Namespace) -> None:
    """Sum of the wheels' members: the installed size before pip adds .pyc and scripts."""
    rows = []
    for w in current_wheels():
        with zipfile.ZipFile(w) as z:
            infos = z.infolist()
        unpacked = sum(i.file_size for i in infos)
        py = sum(i.file_size for i in infos if i.filename.endswith(".py"))
        rows.append((unpacked, w.stat().st_size, py, w.name))
    rows.sort(reverse=True)
    total, comp, py = (sum(r[k] for r in rows) for k in range(3))
    print(
        f"{len(rows)} wheels: compressed {gb(comp)}, unpacked {gb(total)} ({total / 2**30:.2f} GiB), "
        f"ratio {total / comp:.2f}; .py source {py / 1e6:.0f} MB"
    )
    for t, c, _, n in rows[:10]:
        print(f"{t / 1e6:9.1f} MB unpacked {c / 1e6:8.1f} MB whl  {n}")
    write_json(
        "unpacked.json",
        {"wheels": len(rows), "compressed_bytes": comp, "unpacked_bytes": total, "py_source_bytes": py},
    )


# ---- dups --------------------------------------------------------------------------------------------------


def lib_name(filename: str) -> str | None:
    """The library a CUDA-family .so file is a copy of (version and vendoring hash dropped), else None."""
    base = os.path.basename(filename)
    if ".so" not in base or not CUDA_LIB.match(base):
        return None
    return VENDOR_HASH.sub("", base.split(".so", 1)[0])


def cmd_dups(args: argparse.Namespace) -> None:
    """A library twice in the venv is paid twice in the image; wheels hold no symlinks, so even the
    libfoo.so / libfoo.so.1 pair of one wheel is two full copies."""
    libs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    paths: dict[str, list[str]] = defaultdict(list)
    for w in current_wheels():
        label = wheel_label(w)
        with zipfile.ZipFile(w) as z:
            for i in z.infolist():
                if ".dist-info/" in i.filename or i.is_dir():
                    continue
                paths[i.filename].append(label)
                lib = lib_name(i.filename)
                if lib:
                    libs[lib].append({"wheel": label, "path": i.filename, "bytes": i.file_size, "crc": i.CRC})
    dups = []
    for lib, copies in sorted(libs.items()):
        if len(copies) < 2:
            continue
        seen: dict[tuple[int, int], str] = {}
        for c in copies:
            key = (c["crc"], c["bytes"])
            c["same_bytes_as"] = seen.get(key)
            seen.setdefault(key, f"{c['wheel']}:{c['path']}")
        total = sum(c["bytes"] for c in copies)
        extra = total - max(c["bytes"] for c in copies)
        dups.append({"library": lib, "copies": copies, "bytes": total, "extra_bytes": extra})
    dups.sort(key=lambda d: -d["extra_bytes"])
    collisions = {p: ws for p, ws in sorted(paths.items()) if len(ws) > 1}

    print(f"== CUDA-family libraries with more than one copy: {len(dups)} ==")
    for d in dups:
        wheels = sorted({c["wheel"] for c in d["copies"]})
        print(
            f"{d['library']}: {len(d['copies'])} copies in {', '.join(wheels)}; "
            f"{d['extra_bytes'] / 1e6:.1f} MB beyond one copy"
        )
        for c in d["copies"]:
            same = f"  (same bytes as {c['same_bytes_as']})" if c["same_bytes_as"] else ""
            print(f"    {c['bytes'] / 1e6:7.1f} MB  {c['wheel']}: {c['path']}{same}")
    print("== CUDA-family libraries with one copy ==")
    for lib, copies in sorted(libs.items()):
        if len(copies) == 1:
            c = copies[0]
            print(f"    {c['bytes'] / 1e6:7.1f} MB  {lib:34} {c['wheel']}: {c['path']}")
    print(f"== the same path written by more than one wheel: {len(collisions) or 'none'} ==")
    for p, ws in collisions.items():
        print(f"    {p}: {', '.join(ws)}")
    for d in dups:
        for c in d["copies"]:
            del c["crc"]
    write_json("dups.json", {"duplicated": dups, "path_collisions": collisions})


# ---- installed ---------------------------------------------------------------------------------------------


def apparent_size(root: Path) -> int:
    """`du -sb`: apparent sizes of files, symlinks and directories, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_size
    return total


def cmd_installed(args: argparse.Namespace) -> None:
    """The venv as the image's COPY --from=build /opt/venv carries it: .pyc included."""
    venv = Path(args.venv)
    site = next(venv.glob("lib/python3*/site-packages"))
    total = apparent_size(venv)
    pyc = sum(p.stat().st_size for p in venv.rglob("*.pyc"))
    dists = []
    for record in site.glob("*.dist-info/RECORD"):
        size = 0
        with open(record, newline="") as f:
            for row in csv.reader(f):
                p = os.path.normpath(site / row[0])
                if os.path.isfile(p) and not os.path.islink(p):
                    size += os.path.getsize(p)
        name, _, version = record.parent.name.removesuffix(".dist-info").partition("-")
        dists.append({"name": name, "version": version, "bytes": size})
    dists.sort(key=lambda d: -d["bytes"])
    print(
        f"venv apparent size {gb(total)} ({total} bytes), of which .pyc {gb(pyc)}; {len(dists)} distributions"
    )
    for d in dists[:10]:
        print(f"{d['bytes'] / 1e6:8.0f} MB  {d['name']} {d['version']}")
    write_json(
        "installed.json",
        {"venv_bytes": total, "pyc_bytes": pyc, "distributions": len(dists), "largest": dists[:20]},
    )


# ---- apt ---------------------------------------------------------------------------------------------------


def base_packages(path: Path) -> set[str]:
    """Package names of the base image list (comment lines skipped)."""
    lines = path.read_text().splitlines()
    return {p for line in lines if not line.lstrip().startswith("#") for p in line.split()}


def host_distro() -> str:
    """Whose apt lists gave the sizes (they are the host's, not Ubuntu 24.04's, unless the host runs it)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "this host"
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)', text, re.M)
    return m.group(1) if m else "this host"


def cmd_apt(args: argparse.Namespace) -> None:
    """Installed-Size of the closure of the Dockerfile's apt-get install, less the packages already in
    ubuntu:24.04."""
    pkgs = Path(args.closure).read_text().split()
    base = base_packages(Path(args.base))
    out = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *pkgs], capture_output=True, text=True, check=True
    ).stdout
    added, in_base, rows = 0, 0, []
    for block in out.strip().split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in block.splitlines() if ":" in line and not line.startswith(" ")
        )
        size = int(fields.get("Installed-Size", "0").strip()) * 1024
        name = fields["Package"].strip()
        if name in base:
            in_base += size
        else:
            added += size
            rows.append((size, name))
    rows.sort(reverse=True)
    distro = host_distro()
    print(
        f"apt closure {len(pkgs)} packages (sizes from {distro}); not in ubuntu:24.04: {len(rows)} packages, "
        f"{added / 1e6:.0f} MB; already in it: {in_base / 1e6:.0f} MB"
    )
    for size, name in rows[:10]:
        print(f"  {size / 1e6:6.1f} MB {name}")
    write_json(
        "apt.json",
        {
            "closure": len(pkgs),
            "added_packages": len(rows),
            "added_bytes": added,
            "in_base_bytes": in_base,
            "sizes_from": distro,
        },
    )


# ---- summary -----------------------------------------------------------------------------------------------


def cmd_summary(args: argparse.Namespace) -> None:
    """One table, and summary.json: base + apt + venv is the image (the other layers are a few KB)."""
    sizes, unpacked, installed, dups = (
        read_json(f"{n}.json") for n in ("sizes", "unpacked", "installed", "dups")
    )
    apt = read_json("apt.json") if Path("apt.json").exists() else None
    base = int(os.environ.get("UBUNTU_BASE_BYTES", UBUNTU_BASE_BYTES))
    apt_bytes = apt["added_bytes"] if apt else 0
    total = base + apt_bytes + installed["venv_bytes"]
    summary = {
        "index_url": args.index_url,
        "compressed_download_bytes": sizes["compressed_bytes"],
        "downloaded_wheels": sizes["wheels"],
        "unpacked_wheels_bytes": unpacked["unpacked_bytes"],
        "wheels": unpacked["wheels"],
        "installed_venv_bytes": installed["venv_bytes"],
        "installed_pyc_bytes": installed["pyc_bytes"],
        "apt_added_bytes": apt_bytes if apt else None,
        "apt_added_packages": apt["added_packages"] if apt else None,
        "apt_sizes_from": apt["sizes_from"] if apt else None,
        "base_bytes": base,
        "estimated_total_bytes": total,
        "largest_distributions": installed["largest"][:5],
        "duplicated_cuda_libraries": [
            {
                "library": d["library"],
                "copies": len(d["copies"]),
                "extra_bytes": d["extra_bytes"],
                "wheels": sorted({c["wheel"] for c in d["copies"]}),
            }
            for d in dups["duplicated"]
        ],
        "path_collisions": dups["path_collisions"],
        "elapsed_s": args.elapsed,
    }
    write_json("summary.json", summary)

    apt_note = (
        f"{apt['added_packages']} packages not in ubuntu:24.04 (sizes: {apt['sizes_from']})" if apt else ""
    )
    table = [
        ("compressed download", sizes["compressed_bytes"], f"{sizes['wheels']} wheels from the index"),
        (
            "unpacked wheels",
            unpacked["unpacked_bytes"],
            f"{unpacked['wheels']} wheels (+ deepspeed, rpo-rl built)",
        ),
        ("installed venv (with .pyc)", installed["venv_bytes"], f".pyc {gb(installed['pyc_bytes'])}"),
        ("apt added", apt_bytes if apt else None, apt_note or "not measured (no apt here)"),
        ("base (ubuntu:24.04)", base, "docker image ls size"),
        ("estimated total", total, "base + apt added + installed venv"),
    ]
    print(f"== ENGINE=gpu image estimate (index {args.index_url}) ==")
    for label, value, note in table:
        shown = gb(value) if value is not None else "n/a"
        print(f"  {label:28} {shown:>10}   {note}")
    print("  five largest installed distributions:")
    for d in installed["largest"][:5]:
        print(f"    {gb(d['bytes']):>10}  {d['name']} {d['version']}")
    print("  duplicated CUDA-family libraries:" + ("" if dups["duplicated"] else " none"))
    for d in summary["duplicated_cuda_libraries"]:
        print(
            f"    {d['library']:14} {d['copies']} copies, {d['extra_bytes'] / 1e6:6.1f} MB beyond one"
            f"  ({', '.join(d['wheels'])})"
        )
    if args.elapsed is not None:
        print(f"  took {args.elapsed:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sizes", help="compressed wheel sizes by HTTP HEAD")
    p.add_argument("report", help="pip's --report JSON")
    p.set_defaults(func=cmd_sizes)
    sub.add_parser("unpacked", help="unpacked size of the wheels").set_defaults(func=cmd_unpacked)
    sub.add_parser("dups", help="duplicated CUDA-family libraries").set_defaults(func=cmd_dups)
    p = sub.add_parser("installed", help="apparent size of an installed venv")
    p.add_argument("venv")
    p.set_defaults(func=cmd_installed)
    p = sub.add_parser("apt", help="apt packages that ubuntu:24.04 lacks")
    p.add_argument("closure", help="package names, one a line (apt-get -s ... install)")
    p.add_argument("--base", default=str(BASE_LIST), help="package list of the base image")
    p.set_defaults(func=cmd_apt)
    p = sub.add_parser("summary", help="the final table and summary.json")
    p.add_argument("--index-url", default="https://pypi.org/simple")
    p.add_argument("--elapsed", type=float, default=None, help="seconds the whole estimate took")
    p.set_defaults(func=cmd_summary)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
