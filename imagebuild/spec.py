"""Read Catalyst spec files: jinja2, then ``@NAME@`` placeholders, then Catalyst's syntax.

The syntax is that of Catalyst's ``SpecParser`` (catalyst/config.py). Where Catalyst is silent
(a repeated key overwrites the first) imagebuild reports an error, and it reports every problem
of a file at once, each as ``path:line: problem``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from imagebuild import options
from imagebuild.config import Arch
from imagebuild.errors import ConfigError, SpecError

logger = logging.getLogger(__name__)

# --- The keys Catalyst accepts (required_values | valid_values of every target) -------------

# catalyst/targets/*.py (Catalyst maps "-" to "_" to find the module)
CATALYST_TARGETS = frozenset("""diskimage-stage1 diskimage-stage2 embedded livecd-stage1
    livecd-stage2 netboot snapshot stage1 stage2 stage3 stage4""".split())

# Keys of every stage target (catalyst/base/stagebase.py, StageBase.__init__) and of the
# snapshot target, then each target's own keys (catalyst/targets/<target>.py).
_COMMON_KEYS = """
    profile rel_type snapshot_treeish source_subpath subarch target version_stamp asflags
    binrepo_path catalyst_use cbuild cflags common_flags compression_mode cxxflags
    decompressor_search_order fcflags fflags hostuse install_mask interpreter keep_repos
    kerncache_path ldflags pkgcache_path portage_confdir rename_regexp repos portage_prefix
    chost update_seed update_seed_command boot/kernel
"""
_TARGET_KEYS = {
    "diskimage": """packages use bootargs depclean empty fsops fsscript gk_mainargs modblacklist
        motd qcow2 qcow2_size qcow2_efisize qcow2_roottype rcadd rcdel readme rm type sshkey
        unmerge users verify volid""",
    "livecd": """packages use bootargs cdtar depclean empty fsops fsscript fstype gk_mainargs iso
        iso_extra_partition linuxrc modblacklist motd overlay rcadd rcdel readme rm
        root_overlay type unmerge users verify volid""",
    "embedded": """empty fs-finish fs-ops fs-prepare fs-type linuxrc mergeroot packages rm
        root_overlay runscript unmerge use""",
    "netboot": "busybox_config extra_files linuxrc overlay packages root_overlay use",
    "stage4": """packages empty fsscript gk_mainargs groups linuxrc rcadd rcdel rm root_overlay
        ssh_public_keys unmerge use users""",
}
CATALYST_KEYS = frozenset(_COMMON_KEYS.split()) | {
    f"{prefix}/{name}" for prefix, names in _TARGET_KEYS.items() for name in names.split()
}

# boot/kernel/<name>/<field>, valid for each <name> listed in boot/kernel
# (StageBase.set_valid_build_kernel_vars).
KERNEL_FIELDS = frozenset("""aliases config console distkernel dracut_args extraversion
    gk_action gk_kernargs initramfs_overlay packages softlevel sources use""".split())
_KERNEL_KEY = re.compile(r"boot/kernel/([^/]+)/([^/]+)")
# netboot/packages/<atom>/files, valid for each <atom> listed in netboot/packages (netboot.py).
_NETBOOT_FILES_KEY = re.compile(r"netboot/packages/(.+)/files")

# --- imagebuild's own keys (documented in specs/README.md) ----------------------------------

# They and their checks come from the settings table (imagebuild.options).
IMAGEBUILD_KEYS = options.SPEC_KEYS
DISKIMAGE_TARGETS = frozenset({"diskimage-stage1", "diskimage-stage2"})

_EMPTY: Mapping = MappingProxyType({})
_COMMENT = re.compile(r"\s*#.*$")  # Catalyst's trailing_comment
_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
_LINE_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never whitespace
_JINJA_DELIMITERS = re.compile(r"(\{\{|\{%|\{#|\}\}|%\}|#\}|\n)")
_JINJA_CLOSERS = {"{{": "}}", "{%": "%}", "{#": "#}"}


@dataclasses.dataclass(frozen=True)
class SpecEntry:
    key: str
    values: tuple[str, ...]  # whitespace-separated tokens, as Catalyst splits them; () = none
    line: int  # 1-based line of the key
    path: Path | None = None  # the file it came from when not the spec's own (Spec.merged)

    @property
    def is_none(self) -> bool:
        """True for ``key: none``, which Catalyst reads as "unset"."""
        return not self.values


@dataclasses.dataclass(frozen=True)
class Spec:
    path: Path
    entries: Mapping[str, SpecEntry]
    # The @NAME@ values the spec was read with (releng's REPO_DIR tells where its checkout is).
    placeholders: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value's tokens joined by one space; ``default`` if the key is absent or none."""
        entry = self.entries.get(key)
        if entry is None or entry.is_none:
            return default
        return " ".join(entry.values)

    def get_list(self, key: str) -> list[str]:
        entry = self.entries.get(key)
        return list(entry.values) if entry else []

    def where(self, key: str) -> str:
        """``path:line`` of the key for messages (just the path if the key is absent)."""
        entry = self.entries.get(key)
        return f"{entry.path or self.path}:{entry.line}" if entry else str(self.path)

    def merged(self, other: Spec, keys: tuple[str, ...]) -> Spec:
        """This spec with ``keys`` taken from ``other`` (absent there: absent here too); each
        entry still says which file and line it came from."""
        entries = {k: v for k, v in self.entries.items() if k not in keys}
        entries.update({k: dataclasses.replace(other.entries[k], path=other.entries[k].path or other.path)
                        for k in keys if k in other.entries})
        return dataclasses.replace(self, entries=MappingProxyType(entries))

    def __contains__(self, key: object) -> bool:
        return key in self.entries


@dataclasses.dataclass
class _Draft:
    key: str
    tokens: list[str]
    line: int
    indented: bool  # an indented "key:" line is usually a continuation that contains a colon


def load_spec(path: Path, *, placeholders: Mapping[str, str] = _EMPTY,
              variables: Mapping[str, object] = _EMPTY, strict: bool = False) -> Spec:
    """Read and parse the spec file at ``path`` (see ``parse_spec_text``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError(f"cannot read spec file {path}: {reason}",
                        hint="check the path (the shipped specs are specs/<arch>/<variant>.spec)"
                             " and that it is a readable UTF-8 text file") from None
    return parse_spec_text(text, path, placeholders=placeholders, variables=variables,
                           strict=strict)


def parse_spec_text(text: str, path: Path, *, placeholders: Mapping[str, str] = _EMPTY,
                    variables: Mapping[str, object] = _EMPTY, strict: bool = False) -> Spec:
    """Render ``text`` with jinja2, fill ``@NAME@`` placeholders, parse and validate it.

    An unsupplied placeholder stays as written unless ``strict``. Every problem in the file
    is collected and raised as one SpecError listing ``path:line: problem``.
    """
    path = Path(path)
    problems: list[tuple[int, str]] = []
    drafts = _read_entries(_render(text, path, variables), placeholders, strict, problems)
    _check_keys(drafts, problems)
    _check_values(drafts, problems)
    if problems:
        raise _spec_error(path, problems)

    entries: dict[str, SpecEntry] = {}
    for draft in drafts.values():
        if not draft.tokens:
            logger.warning("%s:%d: no value set for key '%s'; ignoring it (as Catalyst does)",
                           path, draft.line, draft.key)
            continue
        none = len(draft.tokens) == 1 and draft.tokens[0].lower() == "none"
        entries[draft.key] = SpecEntry(draft.key, () if none else tuple(draft.tokens), draft.line)
    return Spec(path, MappingProxyType(entries), MappingProxyType(dict(placeholders)))


# --- Step 1: jinja2, keeping track of source lines ------------------------------------------

def _render(text: str, path: Path, variables: Mapping[str, object]) -> list[tuple[int, str]]:
    """Render the template; return each output line with the source line it came from.

    Blocks such as ``{% if %}`` and ``{% for %}`` add and drop lines, so every source line
    gets an invisible marker (``\\ue000N\\ue001``) at its end before rendering; an output line
    belongs to the first marker at or after it.
    """
    env = _SpecSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        rendered = env.from_string(_mark_lines(text)).render(dict(variables))
    except Exception:
        # Render the text as written: that gives jinja2's own message, and if only the
        # markers upset an unusual template, output lines map one to one.
        try:
            plain = env.from_string(text).render(dict(variables))
        except Exception as exc:  # the template is user code: any failure is the spec's
            if isinstance(exc, jinja2.TemplateSyntaxError):
                line, problem = exc.lineno, f"jinja2 syntax error: {exc.message}"
            elif isinstance(exc, SecurityError):
                line, problem = _template_line(exc), f"jinja2 expression refused: {exc} (a spec is data, not a program)"
            else:
                line, problem = _template_line(exc), f"jinja2 error: {exc}"
            given = ", ".join(sorted(variables)) or "none"
            raise SpecError(f"{path}:{line or '?'}: {problem}",
                            hint=f"fix the jinja2 expression; variables given: {given}") from None
        return list(enumerate(plain.split("\n"), start=1))
    return _unmark_lines(rendered)


class _SpecSandbox(ImmutableSandboxedEnvironment):
    """jinja2 for specs: no attributes of Python's internals, nothing mutated, only the variables
    imagebuild passes, and no expression that builds a huge value (``'x' * 10**12``)."""

    intercepted_binops = frozenset({"*", "**"})
    _LIMIT = 1 << 20  # characters or items; a spec is a few KiB

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError(f"the exponent {right} is too large")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > self._LIMIT:
                    raise SecurityError(f"the result would be longer than {self._LIMIT} items")
        return super().call_binop(context, operator, left, right)


def _mark_lines(text: str) -> str:
    """Append a line marker to every source line that does not end inside a jinja2 tag."""
    out: list[str] = []
    closer: str | None = None
    line = start = 1  # start: the first source line no marker has claimed yet
    for piece in _JINJA_DELIMITERS.split(text):
        if closer is None and piece in _JINJA_CLOSERS:
            closer = _JINJA_CLOSERS[piece]
        elif piece == closer:
            closer = None
        elif piece == "\n":
            if closer in (None, "#}"):  # a marker inside {# #} vanishes harmlessly
                out.append(f"\ue000{start}\ue001")
                start = line + 1
            line += 1
        out.append(piece)
    if closer is None:
        out.append(f"\ue000{start}\ue001")
    return "".join(out)


def _unmark_lines(rendered: str) -> list[tuple[int, str]]:
    numbered: list[tuple[int, str]] = []
    waiting: list[str] = []  # output lines whose marker comes later (multi-line expressions)
    last = 1
    for text in rendered.split("\n"):
        mark = _LINE_MARK.search(text)
        text = _LINE_MARK.sub("", text)
        if mark is None:
            waiting.append(text)
            continue
        last = int(mark.group(1))
        numbered.extend((last, w) for w in waiting)
        numbered.append((last, text))
        waiting = []
    numbered.extend((last, w) for w in waiting)
    return numbered


def _template_line(exc: BaseException) -> int:
    """The template line jinja2 records in the traceback of a render-time error."""
    line, tb = 0, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# --- Step 2: placeholders and Catalyst's line syntax ----------------------------------------

def _read_entries(lines: list[tuple[int, str]], placeholders: Mapping[str, str], strict: bool,
                  problems: list[tuple[int, str]]) -> dict[str, _Draft]:
    """Catalyst's SpecParser.parse, line for line, recording problems instead of stopping."""
    drafts: dict[str, _Draft] = {}
    current: _Draft | None = None
    orphan_reported = False
    for line, raw in lines:
        text = _COMMENT.sub("", raw.strip())
        if not text:
            continue
        text = _fill_placeholders(text, line, placeholders, strict, problems)
        if ":" not in text:
            if current is None:
                if not orphan_reported:  # one report for the whole run of such lines
                    problems.append((line, "syntax error: value without a key; a spec starts "
                                           "with 'key: value' and continuation lines follow it"))
                orphan_reported = True
            else:
                current.tokens += text.split()
            continue

        key, value = text.split(":", 1)
        key = key.rstrip()
        value = value.strip().strip('"')  # Catalyst strips quotes around a value
        current = _Draft(key, value.split(), line, indented=raw[:1].isspace())
        if key in drafts:
            problems.append((line, f"duplicate key '{key}' (first set on line "
                                   f"{drafts[key].line}); keep only one of the two lines"))
        else:
            drafts[key] = current
    return drafts


def _fill_placeholders(text: str, line: int, placeholders: Mapping[str, str], strict: bool,
                      problems: list[tuple[int, str]]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in placeholders:
            return placeholders[name]
        if strict:
            known = ", ".join(f"@{n}@" for n in sorted(placeholders)) or "none"
            problems.append((line, f"placeholder @{name}@ has no value (supplied: {known})"))
        return match.group(0)

    return _PLACEHOLDER.sub(replace, text)


# --- Step 3: keys and values ----------------------------------------------------------------

def _check_keys(drafts: Mapping[str, _Draft], problems: list[tuple[int, str]]) -> None:
    kernels = set(drafts["boot/kernel"].tokens) if "boot/kernel" in drafts else set()
    netboot = set(drafts["netboot/packages"].tokens) if "netboot/packages" in drafts else set()
    for draft in drafts.values():
        key = draft.key
        if key in CATALYST_KEYS or key in IMAGEBUILD_KEYS:
            continue
        if kernel := _KERNEL_KEY.fullmatch(key):
            name, field = kernel.groups()
            if field in KERNEL_FIELDS:
                if name not in kernels:
                    problems.append((draft.line, f"'{key}' configures kernel '{name}', which "
                                                 "is not listed in boot/kernel; add it there"))
                continue
        if files := _NETBOOT_FILES_KEY.fullmatch(key):
            if files.group(1) not in netboot:
                problems.append((draft.line, f"'{key}' is for package '{files.group(1)}', "
                                             "which is not listed in netboot/packages"))
            continue
        problems.append((draft.line, _unknown_key(draft, kernels, netboot)))


def _unknown_key(draft: _Draft, kernels: set[str], netboot: set[str]) -> str:
    key = draft.key
    if not key:
        return "syntax error: ':' with no key before it"
    names = set(kernels)
    if kernel := _KERNEL_KEY.fullmatch(key):
        names.add(kernel.group(1))
    candidates = (
        set(CATALYST_KEYS) | set(IMAGEBUILD_KEYS)
        | {f"boot/kernel/{n}/{f}" for n in names for f in KERNEL_FIELDS}
        | {f"netboot/packages/{p}/files" for p in netboot}
    )
    # Compare the last part among keys of the same family ("imagebuild/colour" is not close
    # to "imagebuild/sector_size" just because both start with "imagebuild/").
    family, _, leaf = key.rpartition("/")
    siblings = {c.rpartition("/")[2]: c for c in candidates if c.rpartition("/")[0] == family}
    close = [siblings[m] for m in difflib.get_close_matches(leaf, siblings, n=1)] or \
        difflib.get_close_matches(key, set(candidates) - set(siblings.values()), n=1)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    if draft.indented and "/" in key:
        return (f"unknown key '{key}': this indented line contains ':', which makes it a new "
                "key, not a continuation (Catalyst syntax); a value cannot hold a slot "
                "dependency such as ':3.12'")
    if family == "imagebuild":
        return f"unknown key '{key}'; imagebuild's keys are {', '.join(sorted(IMAGEBUILD_KEYS))}"
    return f"unknown key '{key}': neither a Catalyst key nor an imagebuild/ key"


_VALUE_CHECKS: Mapping[str, Callable[[str], str | None]] = {
    "target": options.choice(*sorted(CATALYST_TARGETS)),
    "diskimage/type": options.choice("console", "cloud-init", "cloudinit"),
    "diskimage/qcow2": lambda v: None if v.endswith(".qcow2") else "must end in .qcow2",
    # Catalyst's create-qcow2.sh can only make XFS too (mkfs.xfs is hard-wired there).
    "diskimage/qcow2_roottype": options.choice("xfs"),
    **{key: option.check for key, option in options.BY_SPEC_KEY.items()},
}
# Keys whose value is one word; a second word is a mistake, not a list.
_SINGLE_WORD = frozenset({"subarch", "target", "version_stamp", "rel_type", "profile",
                          "diskimage/type", "diskimage/qcow2", "diskimage/qcow2_roottype",
                          *(IMAGEBUILD_KEYS - options.LIST_SPEC_KEYS)})


def _check_values(drafts: Mapping[str, _Draft], problems: list[tuple[int, str]]) -> None:
    for draft in drafts.values():
        if not draft.tokens or [t.lower() for t in draft.tokens] == ["none"]:
            continue  # unset: nothing to validate
        value = " ".join(draft.tokens)
        if draft.key in _SINGLE_WORD and len(draft.tokens) > 1:
            problems.append((draft.line, f"'{draft.key}' takes one word, not '{value}'"))
            continue
        check = _VALUE_CHECKS.get(draft.key)
        if check is None and (kernel := _KERNEL_KEY.fullmatch(draft.key)):
            check = options.YES_NO if kernel.group(2) == "distkernel" else None
        if check and (problem := check(value)):
            problems.append((draft.line, f"'{draft.key}: {value}': {problem}"))

    target, subarch = drafts.get("target"), drafts.get("subarch")
    if target and subarch and " ".join(target.tokens) in DISKIMAGE_TARGETS:
        name = " ".join(subarch.tokens)
        if name != "none" and not _is_arch(name):
            problems.append((subarch.line, f"'subarch: {name}': imagebuild builds disk images for "
                                           f"{', '.join(a.value for a in Arch)} only"))


def _is_arch(name: str) -> bool:
    try:
        Arch.parse(name)
    except ConfigError:
        return False
    return True


def _spec_error(path: Path, problems: list[tuple[int, str]]) -> SpecError:
    listing = "\n".join(f"  {path}:{line}: {text}" for line, text in sorted(problems))
    count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    return SpecError(f"spec {path} has {count}:\n{listing}",
                     hint="fix each line listed; specs/README.md describes imagebuild's keys")
