#!/usr/bin/env python3
"""Side-by-side benchmark: imagebuild against a Catalyst-style pipeline, on the same stage.

    ci/bench.py STAGE.tar [--runs 3] [--work /var/tmp/imagebuild-bench] [--boot]

The reference renders Catalyst's targets/support/create-qcow2.sh with the tools of this host:
``tar -xpf`` the stage, a sparse raw file partitioned by parted through a loop device,
mkfs.fat + ``mkfs.xfs -i nrext64=0``, ``cp -a`` into the mounted root, the ESP filled with
mtools (this kernel has no vfat), grub-mkimage run in the stage's chroot, and
``qemu-img convert -c`` (zlib). imagebuild runs ``imagebuild build amd64 console --stage STAGE
--no-test`` (zlib, its audit included). The two alternate, ``--runs`` times each; the script
prints each run, the medians and the ratios (build time, image size). With ``--boot`` it also
times ``imagebuild smoke-test`` against a bare boot of the same image to the ``login:`` prompt
with the same QEMU command line, and prints that ratio.

Ratios from one run on one machine are what counts here: these 2-core machines are shared and
noisy, so absolute seconds mean little and a ratio from a single timing means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = "20G"
STEPS: list[dict[str, float]] = []  # imagebuild's own step timings, one dict per run (its manifest)


def sh(*cmd: str | Path, **kwargs: object) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,  # type: ignore[call-overload]
                          **kwargs).stdout


def reference(stage: Path, work: Path) -> Path:
    """Catalyst's create-qcow2.sh, step by step, with this host's tools; returns the qcow2."""
    tree, mnt, raw, out = work / "tree", work / "mnt", work / "disk.raw", work / "ref.qcow2"
    tree.mkdir()
    mnt.mkdir()
    sh("tar", "-C", tree, "-xpf", stage, "--numeric-owner", "--xattrs", "--xattrs-include=*")
    sh("truncate", "-s", SIZE, raw)
    loop = sh("losetup", "--find", "--show", "--partscan", raw).strip()
    try:
        sh("parted", "-s", loop, "mklabel", "gpt", "mkpart", "gentooefi", "fat32", "1MiB", "513MiB",
           "set", "1", "esp", "on", "mkpart", "gentooroot", "xfs", "513MiB", "100%")
        if shutil.which("partprobe"):
            sh("partprobe", loop)
        esp, root = f"{loop}p1", f"{loop}p2"
        for _ in range(50):  # the partition nodes appear asynchronously
            if os.path.exists(root):
                break
            time.sleep(0.1)
        sh("mkfs.fat", "-F", "32", "-n", "gentooefi", esp)
        sh("mkfs.xfs", "-q", "-f", "-i", "nrext64=0", "-L", "gentooroot", root)
        sh("mount", root, mnt)
        try:
            sh("cp", "-a", f"{tree}/.", mnt)
            # The ESP: /boot's kernel and initramfs, and GRUB built in the stage's chroot.
            modules = next((tree / "usr/lib/grub").glob("x86_64-efi"))
            sh("chroot", tree, "grub-mkimage", "-O", "x86_64-efi", "-d", f"/{modules.relative_to(tree)}",
               "-p", "/grub", "-o", "/BOOTX64.EFI", "part_gpt", "fat", "xfs", "normal", "linux", "search",
               "search_label", "configfile", "echo", "all_video", "gzio")
            env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
            sh("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", env=env)
            sh("mcopy", "-i", esp, tree / "BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI", env=env)
            boot = [p for p in (tree / "boot").iterdir() if p.is_file()]
            sh("mcopy", "-i", esp, *boot, "::/", env=env)
        finally:
            sh("umount", mnt)
    finally:
        sh("losetup", "--detach", loop)
    sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, out)
    return out


def imagebuild(stage: Path, work: Path) -> Path:
    out = work / "out"
    subprocess.run([sys.executable, "-m", "imagebuild", "build", "amd64", "console", "--stage", str(stage),
                    "--no-test", "-o", str(out), "--work-dir", str(work / "scratch"), "--stamp", "bench"],
                   check=True, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    [image] = out.glob("*.qcow2")
    manifest = json.loads(image.with_name(image.name + ".manifest.json").read_text())
    STEPS.append(manifest["step_seconds"])
    return image


def timed(what: str, make: object, stage: Path, base: Path) -> tuple[float, int, Path]:
    work = Path(tempfile.mkdtemp(prefix=f"{what}-", dir=base))
    started = time.monotonic()
    image = make(stage, work)  # type: ignore[operator]
    seconds = time.monotonic() - started
    size = image.stat().st_size
    print(f"  {what:<10} {seconds:7.1f} s  {size / 2**20:7.1f} MiB", flush=True)
    return seconds, size, image


def bare_boot(image: Path) -> float:
    """QEMU with the smoke test's machine (imagebuild.smoketest.qemu.guest_args) until login:."""
    sys.path.insert(0, str(REPO))
    import pexpect

    from imagebuild.config import Arch
    from imagebuild.smoketest.firmware import find_firmware
    from imagebuild.smoketest.qemu import guest_args

    firmware = find_firmware(Arch.amd64)
    with tempfile.TemporaryDirectory() as tmp:
        vars_copy = Path(tmp) / f"vars.{firmware.format}"
        shutil.copyfile(firmware.vars_template, vars_copy)
        args = ["-nodefaults", "-no-user-config", "-no-reboot",
                *guest_args(arch=Arch.amd64, accel="tcg", firmware=firmware, vars_copy=vars_copy, disk=image,
                            sector_size=512, memory="2G", cpus=2), "-serial", "stdio"]
        started = time.monotonic()
        child = pexpect.spawn("qemu-system-x86_64", args, timeout=600, encoding="utf-8", codec_errors="replace")
        try:
            child.expect("login: ")
            return time.monotonic() - started
        finally:
            child.terminate(force=True)


def smoke(image: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "imagebuild", "smoke-test", str(image), "--arch", "amd64",
                    "--variant", "console", "--results", str(image.parent / "smoke")],
                   check=True, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", type=Path, help="an amd64 stage tarball with a kernel (the stand-in will do)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/imagebuild-bench"))
    parser.add_argument("--boot", action="store_true", help="also: smoke test against a bare boot")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[float, int]]] = {"reference": [], "imagebuild": []}
    boots: dict[str, list[float]] = {"bare boot": [], "smoke test": []}
    try:
        for run in range(1, args.runs + 1):
            print(f"run {run}", flush=True)
            order = [("reference", reference), ("imagebuild", imagebuild)]
            for what, make in order if run % 2 else reversed(order):
                seconds, size, image = timed(what, make, args.stage.resolve(), args.work)
                rows[what].append((seconds, size))
                if args.boot and what == "imagebuild":
                    for kind, measure in (("bare boot", bare_boot), ("smoke test", smoke)):
                        boots[kind].append(measure(image))
                        print(f"  {kind:<10} {boots[kind][-1]:7.1f} s", flush=True)
                shutil.rmtree(image.parents[1] if what == "imagebuild" else image.parent)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    med = {what: (statistics.median(s for s, _ in r), statistics.median(z for _, z in r)) for what, r in rows.items()}
    print(f"\nmedians of {args.runs} alternating runs")
    for what, (seconds, size) in med.items():
        print(f"  {what:<10} {seconds:7.1f} s  {size / 2**20:7.1f} MiB")
    print("imagebuild's steps (median seconds, from its manifests)")
    for step in STEPS[0]:
        print(f"  {statistics.median(s.get(step, 0.0) for s in STEPS):6.1f}  {step}")
    print(f"build time ratio (imagebuild / reference): {med['imagebuild'][0] / med['reference'][0]:.2f}")
    print(f"image size ratio (imagebuild / reference): {med['imagebuild'][1] / med['reference'][1]:.2f}")
    if args.boot:
        ratio = statistics.median(boots["smoke test"]) / statistics.median(boots["bare boot"])
        print(f"smoke test / bare boot to login: {ratio:.2f}")
    print(json.dumps({"runs": args.runs, "medians": med}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
