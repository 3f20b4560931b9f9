"""Catalyst's diskimage-stage1 as a command: emerge a spec's ``diskimage/packages`` into a
stage3 and pack the tree as a seed, which a diskimage-stage2 build starts from.

The package step is the build's own (imagebuild.emerge.run_steps), then Catalyst's clean and
capture. Seeds are kept as Catalyst keeps its builds, ``<cache>/builds/<source_subpath>``, so
a diskimage-stage2 spec's ``source_subpath`` finds the seed its diskimage-stage1 spec made.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from imagebuild.chroot import check_can_execute
from imagebuild.config import Arch
from imagebuild.emerge import read_portage_keys, run_steps
from imagebuild.errors import ConfigError, SpecError
from imagebuild.log import complete_step, logger
from imagebuild.spec import Spec
from imagebuild.stage1 import SEED_COMPRESSION, clean_seed, pack_seed, seed_suffix, spec_path
from imagebuild.tree import Tree
from imagebuild.unpack import unpack_stage
from imagebuild.workspace import Workspace


def check_seed_spec(spec: Spec, arch: Arch) -> list[str]:
    """The package atoms to emerge; SpecError (file:line) if ``spec`` is no diskimage-stage1 spec."""
    target = spec.get("target")
    if target != "diskimage-stage1":
        raise SpecError(f"{spec.where('target')}: target is '{target or '(none)'}', not diskimage-stage1",
                        hint="build a seed from a diskimage-stage1 spec (releng: diskimage-stage1-*.spec); "
                        "diskimage-stage2 specs go to 'imagebuild build'")
    packages = spec.get_list("diskimage/packages")
    if not packages:
        raise SpecError(f"{spec.where('diskimage/packages')}: the spec has no diskimage/packages",
                        hint="list the package atoms to install under diskimage/packages, as Catalyst requires")
    for atom in packages:
        if atom.startswith("-"):
            raise SpecError(f"{spec.where('diskimage/packages')}: '{atom}' is an option, not a package atom",
                            hint="diskimage/packages holds atoms and sets (app-editors/nano, @world) only")
    subarch = spec.get("subarch")
    if subarch in set(Arch) and subarch != arch:
        raise SpecError(f"{spec.where('subarch')}: the spec is for {subarch}, the build for {arch.value}",
                        hint=f"build it as {subarch}, or use the {arch.value} spec")
    return packages


def build_seed(spec: Spec, stage_tarball: Path, output: Path, *, arch: Arch, work_dir: Path, cache_dir: Path,
               repo: Path | None = None, binhost: str | None = None, binhost_keyring: Path | None = None,
               jobs: int | None = None) -> Path:
    """Emerge the spec's diskimage/packages into ``stage_tarball``; write the seed to ``output``.

    The package step is the build's (imagebuild.emerge.run_steps): the repository from
    ``repo`` (bind-mounted read-only, as Catalyst mounts its snapshot) or the stage, binary
    packages from ``binhost`` or the stage's binrepos.conf, signatures verified. Returns ``output``.
    """
    check_seed_spec(spec, arch)
    output = Path(output).absolute()
    seed_suffix(output)
    if output.exists():
        raise ConfigError(f"{output} already exists", hint="remove it or choose another output name")
    keys = read_portage_keys(spec, repo=str(repo) if repo else None, binhost=binhost,
                             keyring=str(binhost_keyring) if binhost_keyring else None)
    if keys.confdir is not None and not keys.confdir.is_dir():
        raise SpecError(f"{spec.where('portage_confdir')}: portage_confdir {keys.confdir} does not exist",
                        hint="point it at a directory of Portage configuration (releng: releases/portage/diskimage)")
    pkgcache = spec_path(spec, "pkgcache_path")
    if spec.get("update_seed", "no") != "no":
        pkgcache = None  # Catalyst uses the package cache only when the seed is not updated
    check_can_execute(arch)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)  # the seed cache's <rel_type> directory
    except OSError as exc:
        raise ConfigError(f"cannot make {output.parent} for the seed: {exc.strerror}",
                          hint="choose a writable directory with --output") from None
    if not os.access(output.parent, os.W_OK):
        raise ConfigError(f"cannot write the seed into {output.parent}", hint="choose a writable directory")

    with Workspace(Path(work_dir), f"seed-{arch.value}") as workspace:
        root = workspace / "root"
        tree = Tree(root)
        with complete_step(f"Unpacking {stage_tarball.name}"):
            logger.info("  %d entries", unpack_stage(stage_tarball, root))
        run_steps(tree, keys, arch, workspace, workspace / "emerge.log", install_kernel=False,
                  cache_dir=cache_dir, pkgcache=pkgcache, jobs=jobs)
        with complete_step("Cleaning the tree (Catalyst's clean)"):
            clean_seed(tree, list(keys.use))
        with complete_step(f"Packing the seed {output.name}"):
            pack_seed(root, output)
        shutil.copyfile(workspace / "emerge.log", output.with_name(_stem(output) + ".emerge.log"))
    logger.info("✓ %s (%.0f MiB)", output, output.stat().st_size / 2**20)
    return output


def _stem(output: Path) -> str:
    return output.name.removesuffix(seed_suffix(output))


# Where seeds are kept, as Catalyst's storedir/builds: source_subpath is relative to it.
SEED_CACHE = "builds"


def seed_subpath(spec: Spec) -> str:
    """What a diskimage-stage1 spec makes, as a source_subpath names it (Catalyst's
    target_subpath): ``<rel_type>/<target>-<subarch>-<version_stamp>``."""
    parts = {k: spec.get(k) for k in ("rel_type", "target", "subarch", "version_stamp")}
    if absent := [k for k, v in parts.items() if not v]:
        raise SpecError(f"{spec.path}: no {', '.join(absent)}, so the seed has no name",
                        hint="a diskimage-stage1 spec names its product with rel_type, target, subarch "
                        "and version_stamp, as Catalyst's do (or give --output)")
    return _checked_subpath(f"{parts['rel_type']}/{parts['target']}-{parts['subarch']}-{parts['version_stamp']}",
                            spec.where("version_stamp"))


def _checked_subpath(subpath: str, where: str) -> str:
    if any(not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", part) for part in subpath.split("/")):
        raise SpecError(f"{where}: '{subpath}' is not a path of plain names below the seed cache",
                        hint="names of letters, digits, '.', '_', '+' and '-', such as "
                        "23.0-default/diskimage-stage1-amd64-console-@TIMESTAMP@ (with @TIMESTAMP@ given)")
    return subpath


def seed_cache_path(cache_dir: Path, subpath: str) -> Path:
    """Where ``imagebuild stage1`` writes the seed ``subpath`` unless told otherwise."""
    return cache_dir / SEED_CACHE / f"{subpath}.tar.zst"


def find_seed(spec: Spec, cache_dir: Path) -> Path | None:
    """The seed a diskimage-stage2 spec's source_subpath names, from the seed cache (any of
    the compressions Catalyst searches); None if the spec does not start from a diskimage-stage1."""
    subpath = spec.get("source_subpath")
    if spec.get("target") != "diskimage-stage2" or not subpath or \
            not subpath.rsplit("/", 1)[-1].startswith("diskimage-stage1-"):
        return None
    subpath = _checked_subpath(subpath, spec.where("source_subpath"))
    builds = cache_dir / SEED_CACHE
    for suffix in sorted(SEED_COMPRESSION, key=len, reverse=True):
        if (found := builds / f"{subpath}{suffix}").is_file():
            return found
    name = subpath.rsplit("/", 1)[-1]
    prefix = name.rsplit("-", 1)[0] if "@" not in name else name.split("@", 1)[0].rstrip("-")
    near = sorted(p.name for p in (builds / subpath).parent.glob(f"{prefix}*.tar*") if not p.name.endswith(".log")) \
        if (builds / subpath).parent.is_dir() else []
    raise ConfigError(
        f"{spec.where('source_subpath')}: the seed {subpath} is not in the seed cache {builds}"
        + (f" (it has: {', '.join(near)})" if near else ""),
        hint="make it with 'imagebuild stage1 ARCH --spec <its diskimage-stage1 spec> --stamp STAMP' "
        "(the same --stamp as this build), give it with --stage SEED, or build both at once with "
        "--stage1-spec <its diskimage-stage1 spec>")
