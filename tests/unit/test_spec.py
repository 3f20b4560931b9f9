"""The Catalyst spec reader: syntax, jinja2, placeholders, validation and the shipped specs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from imagebuild.errors import SpecError
from imagebuild.options import OPTIONS
from imagebuild.spec import (
    CATALYST_KEYS,
    IMAGEBUILD_KEYS,
    Spec,
    SpecEntry,
    load_spec,
    parse_spec_text,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "specs"
STAMP = "20260105T023012Z"


def parse(text: str, **kwargs) -> Spec:
    return parse_spec_text(text, Path("test.spec"), **kwargs)


def problems(text: str, **kwargs) -> list[str]:
    """The ``path:line: problem`` lines of the SpecError that ``text`` must raise."""
    with pytest.raises(SpecError) as caught:
        parse(text, **kwargs)
    return [line.strip() for line in caught.value.message.splitlines()[1:]]


# --- Catalyst syntax ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def syntax() -> Spec:
    return load_spec(FIXTURES / "syntax.spec", placeholders={"TIMESTAMP": STAMP})


def test_single_values_and_trailing_comment(syntax: Spec) -> None:
    assert syntax.get("subarch") == "amd64"
    assert syntax.get("target") == "diskimage-stage1"
    assert syntax.entries["target"] == SpecEntry("target", ("diskimage-stage1",), 4)


def test_no_space_after_colon(syntax: Spec) -> None:
    assert syntax.get("rel_type") == "23.0-default"


def test_multi_line_value_with_comments_and_blank_line(syntax: Spec) -> None:
    assert syntax.get_list("diskimage/packages") == [
        "app-editors/vim", "app-misc/tmux", "net-misc/curl", "sys-process/htop",
    ]
    assert syntax.entries["diskimage/packages"].line == 12
    assert syntax.get("diskimage/packages") == (
        "app-editors/vim app-misc/tmux net-misc/curl sys-process/htop"
    )


def test_value_that_starts_on_the_next_line(syntax: Spec) -> None:
    assert syntax.get_list("diskimage/use") == ["-X", "bash-completion"]
    assert syntax.where("diskimage/use") == f"{FIXTURES / 'syntax.spec'}:17"


def test_value_is_split_at_the_first_colon_only(syntax: Spec) -> None:
    assert syntax.get("imagebuild/mirror") == "http://127.0.0.1:8080/gentoo"


def test_quotes_around_a_value_are_removed_as_catalyst_does(syntax: Spec) -> None:
    assert syntax.get_list("diskimage/bootargs") == ["console=ttyS0", "quiet"]


def test_none_means_unset(syntax: Spec) -> None:
    assert "diskimage/motd" in syntax
    assert syntax.entries["diskimage/motd"].is_none
    assert syntax.get("diskimage/motd") is None
    assert syntax.get("diskimage/motd", "fallback") == "fallback"
    assert syntax.get_list("diskimage/motd") == []


def test_none_is_case_insensitive_and_only_alone() -> None:
    spec = parse("diskimage/motd: NONE\ndiskimage/rm: none /etc/motd\n")
    assert spec.get("diskimage/motd", "x") == "x"
    assert spec.get_list("diskimage/rm") == ["none", "/etc/motd"]


def test_key_without_value_is_dropped_with_a_warning(
    syntax: Spec, caplog: pytest.LogCaptureFixture
) -> None:
    assert "diskimage/readme" not in syntax
    with caplog.at_level(logging.WARNING, logger="imagebuild"):
        spec = parse("subarch: amd64\ndiskimage/readme:\n")
    assert "diskimage/readme" not in spec
    assert "test.spec:2" in caplog.text and "diskimage/readme" in caplog.text


def test_slashed_and_parameterised_keys(syntax: Spec) -> None:
    assert syntax.get_list("boot/kernel") == ["gentoo", "fallback"]
    assert syntax.get("boot/kernel/gentoo/distkernel") == "yes"
    assert syntax.get_list("boot/kernel/gentoo/dracut_args") == [
        "--xz", "--no-hostonly", "-a", "dmsquash-live",
    ]
    assert syntax.get("boot/kernel/fallback/sources") == "sys-kernel/gentoo-sources"
    assert syntax.get_list("netboot/packages/sys-apps/busybox/files") == [
        "/bin/busybox", "/etc/busybox.conf",
    ]


def test_absent_key() -> None:
    spec = parse("subarch: arm64\n")
    assert "profile" not in spec
    assert spec.get("profile") is None
    assert spec.get("profile", "default") == "default"
    assert spec.get_list("profile") == []
    assert spec.where("profile") == "test.spec"
    assert spec.where("subarch") == "test.spec:1"


def test_indentation_does_not_matter_for_keys() -> None:
    spec = parse("  subarch: amd64\n\tprofile : default/linux/amd64/23.0\n")
    assert spec.get("subarch") == "amd64"
    assert spec.get("profile") == "default/linux/amd64/23.0"


def test_entries_cannot_be_changed(syntax: Spec) -> None:
    with pytest.raises(TypeError):
        syntax.entries["subarch"] = SpecEntry("subarch", ("arm64",), 1)  # type: ignore[index]


def test_every_catalyst_target_family_is_known() -> None:
    for key in ("version_stamp", "update_seed", "diskimage/qcow2_roottype", "diskimage/sshkey",
                "livecd/iso_extra_partition", "embedded/fs-prepare", "netboot/busybox_config",
                "stage4/ssh_public_keys", "portage_prefix", "binrepo_path"):
        assert key in CATALYST_KEYS, key
    assert "snapshot" not in CATALYST_KEYS  # removed from Catalyst; old releng specs use it


# --- Placeholders ---------------------------------------------------------------------------

def test_placeholders_are_filled(syntax: Spec) -> None:
    assert syntax.get("version_stamp") == f"fixture-{STAMP}"


def test_unsupplied_placeholder_stays_as_written(syntax: Spec) -> None:
    assert syntax.get("snapshot_treeish") == "@TREEISH@"
    assert syntax.get("portage_confdir") == "@REPO_DIR@/releases/portage/fixture"


def test_package_sets_are_not_placeholders(syntax: Spec) -> None:
    assert syntax.get_list("update_seed_command") == ["--update", "--deep", "@world"]


def test_strict_placeholders_name_file_line_and_placeholder() -> None:
    found = problems("subarch: amd64\nversion_stamp: @TIMESTAMP@\nsnapshot_treeish: @TREEISH@\n",
                     placeholders={"TIMESTAMP": STAMP}, strict=True)
    assert found == ["test.spec:3: placeholder @TREEISH@ has no value (supplied: @TIMESTAMP@)"]


def test_strict_mode_ignores_placeholders_in_comments() -> None:
    spec = parse("# built at @TIMESTAMP@\nversion_stamp: x  # @TIMESTAMP@\n", strict=True)
    assert spec.get("version_stamp") == "x"


def test_placeholder_value_is_split_into_tokens() -> None:
    spec = parse("diskimage/packages: @EXTRA@\n", placeholders={"EXTRA": "app-misc/a app-misc/b"})
    assert spec.get_list("diskimage/packages") == ["app-misc/a", "app-misc/b"]


# --- jinja2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("arch", "variant", "rcadd"),
    [("amd64", "console", None), ("arm64", "cloud-init", "cloud-init-local|boot sshd|default")],
)
def test_jinja2_variables_and_blocks(arch: str, variant: str, rcadd: str | None) -> None:
    spec = load_spec(FIXTURES / "template.spec", placeholders={"TIMESTAMP": STAMP},
                     variables={"arch": arch, "variant": variant, "kernels": ["gentoo", "spare"]})
    assert spec.get("subarch") == arch
    assert spec.get("diskimage/type") == variant
    assert spec.get("diskimage/rcadd") == rcadd
    assert spec.get("diskimage/qcow2") == f"di-{arch}-{variant.replace('-', '')}-{STAMP}.qcow2"
    assert spec.get_list("boot/kernel") == ["gentoo", "spare"]
    assert spec.get("boot/kernel/spare/distkernel") == "yes"
    assert spec.get("imagebuild/sector_size") == "512"


def test_lines_refer_to_the_template_not_the_rendered_text() -> None:
    spec = load_spec(FIXTURES / "template.spec",
                     variables={"arch": "arm64", "variant": "cloud-init", "kernels": ["a", "b"]})
    assert spec.entries["subarch"].line == 3
    assert spec.entries["diskimage/type"].line == 9
    assert spec.entries["diskimage/rcadd"].line == 10
    assert spec.entries["boot/kernel"].line == 13
    assert spec.entries["boot/kernel/b/distkernel"].line == 15
    assert spec.entries["imagebuild/sector_size"].line == 17


def test_error_lines_after_jinja2_blocks_are_source_lines() -> None:
    text = ("{% for k in kernels -%}\n"
            "boot/kernel/{{ k }}/distkernel: yes\n"
            "{% endfor %}\n"
            "{% if false %}\nsubarch: amd64\n{% endif %}\n"
            "boot/kernel: {{ kernels | join(' ') }}\n"
            "{% set sizes = [\n  20,\n  30] %}\n"
            "diskimage/qcow2_sise: {{ sizes[0] }}GiB\n")
    assert problems(text, variables={"kernels": ["a", "b", "c"]}) == [
        "test.spec:11: unknown key 'diskimage/qcow2_sise'; did you mean 'diskimage/qcow2_size'?"
    ]


def test_multi_line_jinja2_output_keeps_its_line() -> None:
    spec = parse("subarch: amd64\ndiskimage/packages: {{ pkgs | join('\\n') }}\nprofile: p\n",
                 variables={"pkgs": ["app-misc/a", "app-misc/b"]})
    assert spec.get_list("diskimage/packages") == ["app-misc/a", "app-misc/b"]
    assert spec.entries["diskimage/packages"].line == 2
    assert spec.entries["profile"].line == 3


def test_jinja2_undefined_variable_names_file_and_line() -> None:
    with pytest.raises(SpecError) as caught:
        parse("subarch: amd64\n\nprofile: {{ profile }}\n", variables={"arch": "amd64"})
    assert caught.value.message == "test.spec:3: jinja2 error: 'profile' is undefined"
    assert "arch" in caught.value.hint


def test_jinja2_syntax_error_names_file_and_line() -> None:
    with pytest.raises(SpecError) as caught:
        parse("subarch: amd64\n{% if %}\nprofile: x\n{% endif %}\n")
    assert caught.value.message.startswith("test.spec:2: jinja2 syntax error:")


def test_jinja2_runtime_error_names_file_and_line() -> None:
    with pytest.raises(SpecError, match=r"^test\.spec:2: jinja2 error: unsupported operand"):
        parse("subarch: amd64\nprofile: {{ 1 + 'a' }}\n")


# --- Errors: each kind, and all of them at once ---------------------------------------------

def test_continuation_before_any_key_is_a_syntax_error() -> None:
    found = problems("# comment\napp-misc/screen\napp-misc/tmux\nsubarch: amd64\n")
    assert len(found) == 1
    assert found[0].startswith("test.spec:2: syntax error: value without a key")


def test_colon_without_key() -> None:
    assert problems(": amd64\n") == ["test.spec:1: syntax error: ':' with no key before it"]


def test_unknown_key_suggests_the_closest_known_key() -> None:
    assert problems("subarch: amd64\nversion_stanp: 1\n") == [
        "test.spec:2: unknown key 'version_stanp'; did you mean 'version_stamp'?"
    ]


def test_unknown_imagebuild_key_lists_imagebuild_keys() -> None:
    (found,) = problems("imagebuild/colour: blue\n")
    assert found.startswith("test.spec:1: unknown key 'imagebuild/colour'; imagebuild's keys")
    assert "imagebuild/sector_size" in found


def test_unknown_key_with_nothing_close() -> None:
    assert problems("frobnicate: yes\n") == [
        "test.spec:1: unknown key 'frobnicate': neither a Catalyst key nor an imagebuild/ key"
    ]


def test_slot_dependency_on_a_continuation_line_is_explained() -> None:
    (found,) = problems("diskimage/packages:\n\tapp-misc/a\n\tdev-lang/python:3.12\n")
    assert found.startswith("test.spec:3: unknown key 'dev-lang/python': this indented line")


def test_duplicate_key_names_both_lines() -> None:
    assert problems("subarch: amd64\nprofile: p\nsubarch: arm64\n") == [
        "test.spec:3: duplicate key 'subarch' (first set on line 1); "
        "keep only one of the two lines"
    ]


def test_kernel_settings_need_the_kernel_listed() -> None:
    assert problems("boot/kernel: gentoo\nboot/kernel/other/config: /k.config\n") == [
        "test.spec:2: 'boot/kernel/other/config' configures kernel 'other', "
        "which is not listed in boot/kernel; add it there"
    ]
    assert problems("boot/kernel: gentoo\nboot/kernel/gentoo/confg: /k.config\n") == [
        "test.spec:2: unknown key 'boot/kernel/gentoo/confg'; "
        "did you mean 'boot/kernel/gentoo/config'?"
    ]


def test_netboot_files_need_the_package_listed() -> None:
    (found,) = problems("netboot/packages: app-misc/a\nnetboot/packages/app-misc/b/files: /b\n")
    assert found.startswith("test.spec:2: 'netboot/packages/app-misc/b/files' is for package")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("target: stage5", "'target: stage5': must be one of: diskimage-stage1, diskimage-stage2"),
        ("diskimage/type: generic", "must be one of: console, cloud-init, cloudinit"),
        ("diskimage/qcow2: image.raw", "'diskimage/qcow2: image.raw': must end in .qcow2"),
        ("diskimage/qcow2_size: big", "cannot read size 'big'"),
        ("diskimage/qcow2_efisize: 512 potatoes", "cannot read size '512 potatoes'"),
        ("diskimage/qcow2_roottype: btrfs", "must be one of: xfs"),
        ("boot/kernel/gentoo/distkernel: true", "must be one of: yes, no"),
        ("imagebuild/stage: stage3.zip", "must be mirror, standin, standin-systemd, standin-openrc or a stage tarball"),
        ("imagebuild/sector_size: 2048", "must be one of: 512, 4096"),
        ("imagebuild/compression: xz", "must be one of: zlib, zstd"),
        ("imagebuild/smoke_test: true", "must be one of: yes, no"),
        ("imagebuild/boot_timeout: soon", "must be a number of seconds > 0"),
        ("imagebuild/boot_timeout: 0", "must be a number of seconds > 0"),
        ("imagebuild/boot_timeout: inf", "must be a number of seconds > 0"),
        ("imagebuild/mirror: distfiles.gentoo.org", "must be an http(s):// or file:// URL"),
        ("imagebuild/mirror: https://", "must be an http(s):// or file:// URL"),
        ("profile: default/linux amd64", "'profile' takes one word"),
        ("imagebuild/stage: /my stages/s.tar", "'imagebuild/stage' takes one word"),
    ],
)
def test_bad_values_are_reported_with_line(line: str, expected: str) -> None:
    (found,) = problems(f"boot/kernel: gentoo\n{line}\n")
    assert found.startswith("test.spec:2: ")
    assert expected in found


@pytest.mark.parametrize(
    "line",
    ["imagebuild/stage: standin", "imagebuild/stage: /var/cache/stage3-amd64.tar.zst",
     "imagebuild/stage: ./stage3.tar", "imagebuild/boot_timeout: 1.5",
     "imagebuild/mirror: file:///srv/mirror", "imagebuild/mirror: http://[::1]:8080/",
     "imagebuild/sector_size: 4096", "imagebuild/compression: zstd",
     "diskimage/type: cloudinit", "diskimage/qcow2_size: 4.5G", "imagebuild/smoke_test: none"],
)
def test_good_values_pass(line: str) -> None:
    key = line.split(":")[0]
    assert key in parse(line + "\n")


def test_subarch_is_limited_only_for_disk_images() -> None:
    assert parse("subarch: sparc64\ntarget: stage3\n").get("subarch") == "sparc64"
    assert problems("target: diskimage-stage2\nsubarch: loong\n") == [
        "test.spec:2: 'subarch: loong': imagebuild builds disk images for amd64, arm64, riscv64 only"
    ]
    # Gentoo's names for riscv64 (releng's riscv specs say rv64_lp64d).
    assert parse("target: diskimage-stage2\nsubarch: rv64_lp64d\n").get("subarch") == "rv64_lp64d"
    assert parse("target: diskimage-stage1\nsubarch: riscv\n").get("subarch") == "riscv"


def test_all_problems_of_a_file_are_reported_at_once() -> None:
    path = FIXTURES / "many-errors.spec"
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    lines = caught.value.message.splitlines()
    assert lines[0] == f"spec {path} has 14 problems:"
    reported = [int(line.strip().split(":")[1]) for line in lines[1:]]
    assert reported == [2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19]
    assert all(line.strip().startswith(f"{path}:") for line in lines[1:])
    text = caught.value.message
    assert "did you mean 'diskimage/qcow2_size'?" in text
    assert "duplicate key 'diskimage/type' (first set on line 6)" in text
    assert "did you mean 'boot/kernel/gentoo/distkernel'?" in text
    assert caught.value.hint and "specs/README.md" in caught.value.hint


# --- Reading files --------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(tmp_path / "nope.spec")
    assert str(tmp_path / "nope.spec") in caught.value.message
    assert "No such file" in caught.value.message
    assert caught.value.hint


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.spec"
    path.write_bytes(b"subarch: amd64\nprofile: caf\xe9\n")
    with pytest.raises(SpecError, match="cannot read spec file .*latin1.spec"):
        load_spec(path)


# --- The shipped specs ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["amd64", "arm64"])
@pytest.mark.parametrize(("variant", "file_part"), [("console", "console"),
                                                    ("cloud-init", "cloudinit")])
@pytest.mark.parametrize("init", ["systemd", "openrc"])
def test_shipped_specs(arch: str, variant: str, file_part: str, init: str) -> None:
    suffix = "" if init == "systemd" else "-openrc"
    path = REPO / "specs" / arch / f"{variant}{suffix}.spec"
    spec = load_spec(path, placeholders={"TIMESTAMP": STAMP}, strict=True)
    assert spec.get("subarch") == arch
    assert spec.get("target") == "diskimage-stage2"
    assert spec.get("version_stamp") == STAMP
    assert spec.get("rel_type") == "23.0-default"
    assert spec.get("profile", "").startswith(f"default/linux/{arch}/23.0")
    # Gentoo's systemd profiles end in /systemd; its OpenRC profile is the plain 23.0 one.
    assert spec.get("profile", "").endswith("/systemd") == (init == "systemd")
    assert spec.get("source_subpath", "").endswith(f"-{init}-@TIMESTAMP@".replace("@TIMESTAMP@", STAMP))
    assert spec.get("diskimage/type") == variant
    assert spec.get("diskimage/qcow2") == f"di-{arch}-{file_part}{suffix}-{STAMP}.qcow2"
    assert spec.get("diskimage/qcow2_size") == "20GiB"
    assert spec.get("diskimage/qcow2_efisize") == "512MiB"
    assert spec.get("diskimage/qcow2_roottype") == "xfs"
    assert spec.get_list("boot/kernel") == ["gentoo"]
    # The shipped specs show every imagebuild/ key that has a default, with that default.
    defaults = {o.spec_key: o.default for o in OPTIONS if o.spec_key in IMAGEBUILD_KEYS and o.default}
    assert {k: spec.get(k) for k in defaults} == defaults
    assert spec.get("imagebuild/stage") == "mirror"


def test_shipped_specs_are_all_there() -> None:
    found = sorted(p.relative_to(REPO / "specs").as_posix()
                   for p in (REPO / "specs").rglob("*.spec"))
    assert found == sorted(f"{arch}/{variant}{init}.spec" for arch in ("amd64", "arm64", "riscv64")
                           for variant in ("cloud-init", "console") for init in ("", "-openrc"))


@pytest.mark.parametrize("expression", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch /tmp/imagebuild-pwned') }}",
    "{{ lipsum.__globals__['os']._exit(0) }}",
    "{{ 'x' * 10**12 }}",
    "{{ 2 ** 100000 }}",
    "{% set l = [1] %}{{ l.append(2) }}",
])
def test_spec_jinja2_is_sandboxed(expression: str) -> None:
    """A spec is data: its jinja2 reaches no Python internals, mutates nothing, builds nothing huge."""
    with pytest.raises(SpecError) as caught:
        parse_spec_text(f"subarch: amd64\nversion_stamp: {expression}\n", Path("evil.spec"))
    assert caught.value.message.startswith("evil.spec:2: jinja2 expression refused"), caught.value.message
    assert not Path("/tmp/imagebuild-pwned").exists()
