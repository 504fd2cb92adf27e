"""capmon.agent.holders: cgroup parsing over real files, /proc resolution over a fake tree, the
cache, the privacy options and the per-window accumulator."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from capmon.agent import wire
from capmon.agent.configfile import ConfigError, decode
from capmon.agent.holders import (
    REASON_EXITED,
    REASON_NOT_READABLE,
    REASON_NOT_VISIBLE,
    CgroupOwner,
    HolderResolver,
    HoldersConfig,
    HolderWindows,
    ProcessOwner,
    ResolvedHolder,
    parse_cgroup,
    resolve_process,
)
from capmon.agent.probe import Holder

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cgroup"

D = "docker"
CTR = "containerd"
SVC = "systemd-service"
SES = "systemd-session"

# file → (runtime, container_id, pod_uid, slurm_job_id, session_uid, unit)
CASES: dict[str, tuple] = {
    "docker_v1_cgroupfs.txt": (
        D,
        "5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498",
        None,
        None,
        None,
        None,
    ),
    # The v1 lines name the container; the v2 line (containerd.service) is less specific.
    "docker_v1_hybrid_containerd_service.txt": (
        D,
        "2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d",
        None,
        None,
        None,
        None,
    ),
    "docker_v1_systemd_centos.txt": (
        D,
        "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d",
        None,
        None,
        None,
        None,
    ),
    # The innermost container is the one that runs the process.
    "docker_in_docker_v1_rancheros.txt": (
        D,
        "ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a",
        None,
        None,
        None,
        None,
    ),
    "docker_v1_bare_id_debian.txt": (
        None,
        "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970",
        None,
        None,
        None,
        None,
    ),
    "docker_v2_systemd_id_elided.txt": (D, "xxx", None, None, None, None),
    # cgroupfs driver: the pod and the container, but the runtime is not named in the path.
    "k8s_cgroupfs_v1_besteffort.txt": (
        None,
        "cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c",
        "74ba62da-1a3d-11e7-bb11-080027cb0e22",
        None,
        None,
        None,
    ),
    "k8s_cgroupfs_v1_child_cgroup.txt": (
        None,
        "c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903",
        "f8a694f2-7c08-11e9-98da-000c29077430",
        None,
        None,
        None,
    ),
    "k8s_cgroupfs_v1_containerd_1.2.txt": (
        None,
        "5dd96d5394ca930a854a390ea46f7515a8bc930123eb3251ba20f2708a38fc61",
        "a36d0c1d-0b26-4451-8d80-9c195e004afa",
        None,
        None,
        None,
    ),
    "k8s_cgroupfs_uuid_container_line.txt": (
        None,
        "15aa6e53-b09a-40c7-8558-c6c31e36c88a",
        "e9b90526-f47d-11e8-b2a5-080027b9f4fb",
        None,
        None,
        None,
    ),
    "k8s_cgroupfs_crio_line.txt": (
        "crio",
        "7a92a067289f6197148912be1c15f20f0330c7f3c541473d3b9c4043ca137b42",
        "2fad8aad-dcd0-4fef-b45a-151630b9a4b5",
        None,
        None,
        None,
    ),
    # systemd driver: the pod UID spelled with underscores comes back dashed.
    "k8s_systemd_v1_docker_shim.txt": (
        D,
        "b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70",
        "045b1e35-7f13-11e7-ac42-0050568ffca0",
        None,
        None,
        None,
    ),
    "k8s_systemd_hybrid_containerd_bottlerocket.txt": (
        CTR,
        "f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830",
        "dd1bf9d1-241d-47f5-8e25-12de83135812",
        None,
        None,
        None,
    ),
    "k8s_systemd_v1_crio_1.19.txt": (
        "crio",
        "d6d725b909f37c3e232aadfbafa950a58bfe7baa579ba8c47a12be88bb921607",
        "8ca306fa-3c03-47fa-97dd-19979c345572",
        None,
        None,
        None,
    ),
    # A static pod's UID is the kubelet's config hash: kept as it is.
    "k8s_systemd_v1_crio_static_pod.txt": (
        "crio",
        "7a1fd6fe8cdfbd44dc78c4cc85dad7031eaab4365801684cad0aabdeaf863f9e",
        "487a0dc6dccaeefbcfedba7a7ce1ca18",
        None,
        None,
        None,
    ),
    "k8s_containerd_1.4_systemd_colon_form.txt": (
        CTR,
        "d3d8ccf5cca91931c6285c1d7472c413dd5a7700fddc0aa9f89a9ac7008b003e",
        "2105e389-7471-476e-a50f-6074cef29bbd",
        None,
        None,
        "containerd.service",
    ),
    # Guaranteed pods have no QoS slice.
    "k8s_guaranteed_systemd_docker_line.txt": (
        D,
        "b15a5bdedd2e7645c3be271364324321b908314e4c77857bbfd32a041148c07f",
        "22949dce-fd8b-11ea-8ede-98f2b32c645c",
        None,
        None,
        None,
    ),
    "podman_v1_machine_slice_excerpt.txt": (
        "podman",
        "2521e906f0a0c758c3a7dc4fd68c197e32e96abb4b36807d0b0ede6d014a7c24",
        None,
        None,
        None,
        "init.scope",
    ),
    "podman_v2_user_manager_container.txt": (
        "podman",
        "cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb",
        None,
        None,
        0,
        None,
    ),
    # podman's pause process in the user's manager: not a container.
    "podman_v2_unshare_pause_scope.txt": (SES, None, None, None, 1000, "podman-6696.scope"),
    # A service inside an LXC container does not hide the container.
    "lxc_v1_v2_payload.txt": ("lxc", "buster", None, None, None, "networking.service"),
    "lxc_v2_payload_service.txt": ("lxc", "focal", None, None, None, "avahi-daemon.service"),
    "lxc_attach_own_namespace.txt": (None, None, None, None, None, None),
    # The freezer line is in the job; the rest in slurmd.service: the job wins.
    "slurm_v1_ex3_slurm21.txt": ("slurm", None, None, "748468", None, None),
    "slurm_v1_interactive_step_line.txt": ("slurm", None, None, "280678", None, None),
    "slurm_v2_fox.txt": ("slurm", None, None, "1392969", None, "slurmstepd.scope"),
    "slurm_v2_multiple_slurmd_derived.txt": (
        "slurm",
        None,
        None,
        "4749",
        None,
        "slurm-worker-1_slurmstepd.scope",
    ),
    "session_v2_ssh.txt": (SES, None, None, None, 1000, "session-3.scope"),
    "session_v2_gnome_app.txt": (SES, None, None, None, 1000, "app-gnome-kitty-3842.scope"),
    "session_v1_libcontainer.txt": (SES, None, None, None, 1000, "session-16.scope"),
    "session_v1_old_systemd_nsenter.txt": (SES, None, None, None, 1000, "c2.session"),
    "service_v1_slurmd_excerpt.txt": (SVC, None, None, None, None, "slurmd.service"),
    # A bare slice is no unit.
    "service_v1_kubelet_system_slice.txt": (None, None, None, None, None, None),
    "root_v2_container_namespace.txt": (None, None, None, None, None, None),
    "root_v2_with_v1_net_cls.txt": (None, None, None, None, None, None),
    "host_v1_root.txt": (None, None, None, None, None, None),
}


def test_every_fixture_has_a_case_and_a_source():
    files = {p.name for p in FIXTURES.glob("*.txt")}
    assert files == set(CASES)
    sources = (FIXTURES / "SOURCES.md").read_text()
    assert [f for f in files if f"| {f} |" not in sources] == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_cgroup_real_files(name):
    assert parse_cgroup((FIXTURES / name).read_text()) == CgroupOwner(*CASES[name])


@pytest.mark.parametrize(
    "text, expected",
    [
        # cgroup v2 shapes that the fixtures show only in v1.
        ("0::/system.slice/docker-" + "a" * 64 + ".scope\n", CgroupOwner(D, "a" * 64)),
        (
            "0::/kubepods/burstable/pod" + "1" * 8 + "-2222-3333-4444-" + "5" * 12 + "/" + "b" * 64 + "\n",
            CgroupOwner(None, "b" * 64, "11111111-2222-3333-4444-555555555555"),
        ),
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podAB12CD34_1111_2222_3333_444455556666.slice/cri-containerd-"
            + "c" * 64
            + ".scope",
            CgroupOwner(CTR, "c" * 64, "ab12cd34-1111-2222-3333-444455556666"),
        ),
        # rootless docker in a user's manager
        (
            "0::/user.slice/user-1001.slice/user@1001.service/user.slice/docker-" + "d" * 64 + ".scope",
            CgroupOwner(D, "d" * 64, session_uid=1001),
        ),
        # podman's cgroupfs manager; the conmon monitor is not the container
        ("0::/libpod_parent/libpod-" + "e" * 64, CgroupOwner("podman", "e" * 64)),
        (
            "0::/machine.slice/libpod-conmon-" + "e" * 64 + ".scope",
            CgroupOwner(SVC, unit="libpod-conmon-" + "e" * 64 + ".scope"),
        ),
        # slurmd run inside a pod, a job in it: both known
        (
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda8507382_5d59_4c0a_8119_c6651b541881.slice/system.slice/slurmstepd.scope/job_77/step_extern/user",
            CgroupOwner(
                "slurm", None, "a8507382-5d59-4c0a-8119-c6651b541881", "77", None, "slurmstepd.scope"
            ),
        ),
        ("0::/slurm/uid_1000/job_7/step_0\n", CgroupOwner("slurm", slurm_job_id="7")),
        # slurmstepd itself is no job
        ("0::/system.slice/slurmstepd.scope/system", CgroupOwner(SVC, unit="slurmstepd.scope")),
        (
            "0::/system.slice/nvidia-persistenced.service",
            CgroupOwner(SVC, unit="nvidia-persistenced.service"),
        ),
        ("0::/init.scope", CgroupOwner(SVC, unit="init.scope")),
        # `job_` outside a Slurm tree is not a job
        ("0::/system.slice/job_42/x", CgroupOwner()),
    ],
)
def test_parse_cgroup_shapes(text, expected):
    assert parse_cgroup(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "garbage",
        "0::",
        "::::",
        "1:cpu:relative/path",
        "x" * 100_000,
        "0::/" + "/".join(["a:b:c"] * 500),
        "0::/kubepods/pod/",
        "0::/kubepods.slice/kubepods-pod.slice",
        "0::/docker/",
        "0::/user.slice/user-.slice",
        "0::/slurm/uid_/job_/step_",
        "\x00\xff:\ud800:/\u2028",
        "0::/lxc.payload.",
        "0::/" + "a" * 10_000 + ".service",
    ],
)
def test_parse_cgroup_unknown_shapes_never_raise(text):
    owner = parse_cgroup(text)
    assert isinstance(owner, CgroupOwner)


# ---------------------------------------------------------------------------------------------
# A fake /proc


def _stat(pid: int, comm: str, start: int) -> str:
    fields = ["S", "1", str(pid), str(pid)] + ["0"] * 15 + [str(start)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


class FakeProc:
    def __init__(self, root: Path, host: bool = True) -> None:
        self.root = root
        (root / "2").mkdir(parents=True)
        (root / "2" / "comm").write_text("kthreadd\n" if host else "sh\n")
        (root / "stat").write_text("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n")

    def add(
        self,
        pid: int,
        *,
        uid: int = 1000,
        comm: str = "python3",
        start: int = 5000,
        cgroup: str = "0::/user.slice/user-1000.slice/session-3.scope\n",
    ) -> Path:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "status").write_text(
            f"Name:\t{comm[:15]}\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t100\t100\t100\t100\n"
        )
        (d / "comm").write_text(comm + "\n")
        (d / "stat").write_text(_stat(pid, comm, start))
        (d / "cgroup").write_text(cgroup)
        # What must never be read: a test fails if these are opened (see test below).
        (d / "cmdline").write_text("python3\0train.py\0--token=SECRET\0")
        (d / "environ").write_text("AWS_SECRET_ACCESS_KEY=SECRET\0")
        return d

    def remove(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def names(uid: int) -> str:
    return {0: "root", 1000: "alice", 1001: "bob"}.get(uid, str(uid))


@pytest.fixture
def proc(tmp_path):
    return FakeProc(tmp_path / "proc")


def test_resolve_process_reads_owner(proc):
    proc.add(
        4242,
        uid=1000,
        comm="python3",
        start=123_400,
        cgroup=(FIXTURES / "k8s_systemd_v1_crio_1.19.txt").read_text(),
    )
    owner = resolve_process(4242, str(proc.root), user_name=names)
    assert owner == ProcessOwner(
        pid=4242,
        user="alice",
        uid=1000,
        command="python3",
        start_time=123_400,
        started_at=1_700_000_000 + 123_400 // os.sysconf("SC_CLK_TCK"),
        runtime="crio",
        container_id="d6d725b909f37c3e232aadfbafa950a58bfe7baa579ba8c47a12be88bb921607",
        pod_uid="8ca306fa-3c03-47fa-97dd-19979c345572",
    )


def test_resolve_process_comm_with_spaces_and_parentheses(proc):
    proc.add(7, comm="a) b (c", start=99)
    owner = resolve_process(7, str(proc.root), user_name=names)
    assert (owner.command, owner.start_time, owner.reason) == ("a) b (c", 99, None)


def test_resolve_process_uid_without_passwd_entry_uses_the_real_database(proc):
    # The real password database: 3999999 has no entry here, 0 is root.
    proc.add(10, uid=3_999_999)
    proc.add(11, uid=0)
    assert resolve_process(10, str(proc.root)).user == "3999999"
    assert resolve_process(11, str(proc.root)).user == "root"


def test_resolve_process_gone_and_not_visible(proc, tmp_path):
    assert resolve_process(555, str(proc.root)) == ProcessOwner(555, reason=REASON_EXITED)
    other = FakeProc(tmp_path / "container-proc", host=False)
    other.add(555)  # a PID in the agent's own namespace that happens to have the host PID's number
    assert resolve_process(555, str(other.root)) == ProcessOwner(555, reason=REASON_NOT_VISIBLE)


def test_pid_vanishing_between_listing_and_reading(proc, monkeypatch):
    d = proc.add(77)
    real_open = os.open

    def open_(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path).endswith("/77/stat") and (d / "cgroup").exists():
            (d / "cgroup").unlink()  # exits after its stat was read
        return fd

    monkeypatch.setattr(os, "open", open_)
    assert resolve_process(77, str(proc.root)) == ProcessOwner(77, reason=REASON_EXITED)


def test_pid_reused_while_being_read_is_not_attributed(proc, monkeypatch):
    proc.add(78, comm="old", start=100)
    import capmon.agent.holders as holders

    real_read = holders._read

    def read(path):
        text = real_read(path)
        if path.endswith("/78/cgroup"):
            proc.add(78, comm="new", start=200, uid=1001)
        return text

    monkeypatch.setattr(holders, "_read", read)
    assert resolve_process(78, str(proc.root)).reason == REASON_EXITED


def test_permission_denied_has_its_reason(proc):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    d = proc.add(79)
    (d / "status").chmod(0)
    assert resolve_process(79, str(proc.root)).reason == REASON_NOT_READABLE


def test_never_reads_cmdline_or_environ(proc, monkeypatch):
    proc.add(80)
    opened = []
    real_open = os.open
    monkeypatch.setattr(
        os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k)
    )
    resolver = HolderResolver(HoldersConfig(), str(proc.root), user_name=names)
    resolver.resolve_devices({"GPU-0": (Holder(80, 1 << 30),)})
    assert opened and not [p for p in opened if p.endswith(("cmdline", "environ"))]


# ---------------------------------------------------------------------------------------------
# The resolver and its cache


def test_cache_hits_rereads_only_stat_and_resolves_a_reused_pid(proc, monkeypatch):
    proc.add(100, comm="train", start=1000, uid=1000)
    resolver = HolderResolver(HoldersConfig(), str(proc.root), user_name=names)
    reads = []
    real_open = os.open
    monkeypatch.setattr(
        os,
        "open",
        lambda path, *a, **k: reads.append(str(path).rsplit("/", 1)[-1]) or real_open(path, *a, **k),
    )

    first = resolver.resolve_devices({"GPU-0": (Holder(100),), "GPU-1": (Holder(100),)})
    assert first["GPU-0"][0].owner.user == "alice"
    assert first["GPU-0"][0].owner is first["GPU-1"][0].owner
    cold = list(reads)
    assert sorted(set(cold)) == ["cgroup", "comm", "stat", "status"]

    reads.clear()
    warm = resolver.resolve_devices({"GPU-0": (Holder(100),), "GPU-1": (Holder(100),)})
    assert reads == ["stat"]  # one read for a PID on two devices
    assert warm["GPU-0"][0].owner == first["GPU-0"][0].owner

    # The job ended and a new process got the same PID: another start time, resolved again.
    proc.add(100, comm="other", start=2000, uid=1001)
    again = resolver.resolve_devices({"GPU-0": (Holder(100),)})
    assert (again["GPU-0"][0].owner.user, again["GPU-0"][0].owner.command) == ("bob", "other")
    assert again["GPU-0"][0].key != first["GPU-0"][0].key


def test_cache_prunes_vanished_and_unlisted_pids(proc):
    proc.add(11)
    proc.add(12)
    resolver = HolderResolver(HoldersConfig(), str(proc.root), user_name=names)
    resolver.resolve_devices({"GPU-0": (Holder(11), Holder(12))})
    assert len(resolver) == 2
    proc.remove(12)
    out = resolver.resolve_devices({"GPU-0": (Holder(11), Holder(12))})
    assert out["GPU-0"][1].owner == ProcessOwner(12, reason=REASON_EXITED)
    assert len(resolver) == 1
    resolver.resolve_devices({"GPU-0": ()})
    assert len(resolver) == 0


def test_unknown_holders_stay_unknown_and_disabled_sends_nothing(proc):
    proc.add(5)
    resolver = HolderResolver(HoldersConfig(), str(proc.root))
    assert resolver.resolve_devices({"GPU-0": None, "GPU-1": ()}) == {"GPU-0": None, "GPU-1": []}
    off = HolderResolver(HoldersConfig(enabled=False), str(proc.root))
    assert off.resolve_devices({"GPU-0": (Holder(5),)}) == {"GPU-0": None}


def test_not_visible_namespace_resolves_nothing(tmp_path):
    container = FakeProc(tmp_path / "p", host=False)
    container.add(31)
    resolver = HolderResolver(HoldersConfig(), str(container.root))
    assert resolver.host_pids is False
    [h] = resolver.resolve_devices({"GPU-0": (Holder(31, 10, "python"),)})["GPU-0"]
    assert h.owner == ProcessOwner(31, reason=REASON_NOT_VISIBLE)
    assert h.window(1.0, 10) == wire.HolderWindow(pid=31, command="python", memory_bytes=10, held_s=1.0)


# ---------------------------------------------------------------------------------------------
# Privacy


@pytest.mark.parametrize(
    "config, user, uid, command",
    [
        (HoldersConfig(), "alice", 1000, "python3"),
        (HoldersConfig(users="uid"), "1000", 1000, "python3"),
        (HoldersConfig(users="none"), None, None, "python3"),
        (HoldersConfig(commands=False), "alice", 1000, None),
        (HoldersConfig(users="none", commands=False), None, None, None),
    ],
)
def test_privacy_options_decide_what_leaves(proc, config, user, uid, command):
    proc.add(9, comm="python3", uid=1000)
    resolver = HolderResolver(config, str(proc.root), user_name=names)
    [h] = resolver.resolve_devices({"GPU-0": (Holder(9, 5, name="python3-vendor"),)})["GPU-0"]
    w = h.window(2.0, 5)
    assert (w.user, w.uid, w.command) == (user, uid, command)
    assert w.runtime == "systemd-session"  # the cgroup owner travels whatever the options
    encoded = wire.encode(w)
    assert b"SECRET" not in encoded
    if command is None:
        assert b"python3" not in encoded


def test_holders_config_decodes_from_toml_and_names_bad_values():
    assert decode(HoldersConfig, {}, "agent.toml: [holders]") == HoldersConfig()
    assert decode(
        HoldersConfig, {"users": "uid", "commands": False}, "agent.toml: [holders]"
    ) == HoldersConfig(users="uid", commands=False)
    with pytest.raises(
        ConfigError, match=r"agent\.toml: \[holders\] users: must be one of 'name', 'uid', 'none'"
    ):
        decode(HoldersConfig, {"users": "names"}, "agent.toml: [holders]")
    with pytest.raises(ConfigError, match=r"unknown key 'holders\.cmdline'"):
        decode(HoldersConfig, {"cmdline": True}, "agent.toml: [holders]")
    with pytest.raises(ValueError, match="users must be"):
        HoldersConfig(users="everything")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The accumulator


def held(pid: int, memory: int | None = None, *, start: int = 1, user: str = "alice", **cg) -> ResolvedHolder:
    return ResolvedHolder(
        ProcessOwner(pid, user=user, uid=1000, command="python3", start_time=start, **cg), memory
    )


def test_sample_and_hold_exact_seconds():
    w = HolderWindows()
    a, b = held(1, 100), held(2, 300)
    w.observe("GPU-0", 0.0, [a])
    w.observe("GPU-0", 10.0, [a, b])
    w.observe("GPU-0", 25.0, [b])
    w.observe("GPU-0", 40.0, [])
    [(records, omitted)] = w.close("GPU-0", 60.0).values()
    assert omitted == 0
    # a: 0..25; b: 10..40; nobody 40..60. Sorted by memory first.
    assert [(r.pid, r.held_s, r.memory_bytes) for r in records] == [(2, 30.0, 300), (1, 25.0, 100)]


def test_holders_carry_into_the_next_window_and_memory_is_the_peak():
    w = HolderWindows()
    w.observe("GPU-0", 100.0, [held(1, 10)])
    w.observe("GPU-0", 130.0, [held(1, 50)])
    w.observe("GPU-0", 150.0, [held(1, 20)])
    [(first, _)] = w.close("GPU-0", 160.0).values()
    assert [(r.held_s, r.memory_bytes) for r in first] == [(60.0, 50)]
    # No observation in the next window until 175: the holder seen last holds 160..175, then 175..220.
    w.observe("GPU-0", 175.0, [held(1, 5)])
    [(second, _)] = w.close("GPU-0", 220.0).values()
    assert [(r.held_s, r.memory_bytes) for r in second] == [(60.0, 20)]


def test_unknown_is_not_nobody():
    w = HolderWindows()
    w.observe("GPU-0", 0.0, None)
    w.observe("GPU-1", 0.0, [])
    w.observe("GPU-2", 0.0, [held(1)])
    w.observe("GPU-2", 30.0, None)  # the probe lost track: nothing is credited after 30
    out = w.close(None, 60.0)
    assert out["GPU-0"] == (None, 0)
    assert out["GPU-1"] == ([], 0)
    assert [(r.pid, r.held_s) for r in out["GPU-2"][0]] == [(1, 30.0)]
    assert w.close("GPU-2", 120.0)["GPU-2"] == (None, 0)
    assert w.close("GPU-9", 120.0)["GPU-9"] == (None, 0)


def test_reused_pid_is_a_different_holder():
    w = HolderWindows()
    w.observe("GPU-0", 0.0, [held(7, start=1, user="alice")])
    w.observe("GPU-0", 20.0, [held(7, start=2, user="bob")])
    [(records, _)] = w.close("GPU-0", 60.0).values()
    assert sorted((r.user, r.held_s) for r in records) == [("alice", 20.0), ("bob", 40.0)]


def test_cap_at_the_wire_limit_counts_the_rest_and_orders_by_memory_then_time():
    w = HolderWindows()
    many = [held(pid, memory=pid % 5 or None) for pid in range(1, 41)]
    w.observe("GPU-0", 0.0, many)
    w.observe("GPU-0", 30.0, many[:20])
    [(records, omitted)] = w.close("GPU-0", 60.0).values()
    assert len(records) == wire.MAX_HOLDERS and omitted == 40 - wire.MAX_HOLDERS
    keys = [(-(r.memory_bytes or -1), -r.held_s) for r in records]
    assert keys == sorted(keys)
    assert records[0].memory_bytes == 4 and records[0].held_s == 60.0
    # The holders with no known memory are the ones left out, counted.
    assert all(r.memory_bytes is not None for r in records)


def test_records_fit_the_wire_and_pass_check_report():
    long = "x" * 5000
    h = ResolvedHolder(
        ProcessOwner(
            2**40,
            user=long,
            uid=2**40,
            command=long,
            start_time=1,
            started_at=5,
            runtime="docker",
            container_id=long,
            pod_uid=long,
            slurm_job_id=long,
        ),
        2**60,
        name=long,
    )
    w = HolderWindows()
    w.observe("GPU-0", 0.0, [h])
    [(records, _)] = w.close("GPU-0", 60.0).values()
    r = records[0]
    assert len(r.user) == wire.MAX_NAME_LEN and len(r.command) == wire.MAX_NAME_LEN
    assert len(r.container_id) == len(r.pod_uid) == len(r.slurm_job_id) == wire.MAX_ID_LEN
    assert r.pid is None and r.uid is None and r.memory_bytes is None and r.since is None
    device = wire.DeviceWindow(device_id="GPU-0", vendor="nvidia", state="busy", busy_s=60.0, holders=records)
    report = wire.Report(seq=1, start=1_700_000_000, end=1_700_000_060, devices=[device])
    batch = wire.Batch(agent=wire.AgentIdentity(id="a", host="h"), reports=[report])
    decoded = wire.decode_batch(wire.encode(batch))  # the collector's typed decode accepts it
    assert decoded.reports[0].devices[0].holders == records
    # A pid outside the wire's range is dropped, so the record is one check_report refuses: say so.
    assert wire.check_report(report) == ("a process holder needs its pid", "$.devices[0].holders[0].pid")


def test_process_record_round_trips_through_the_wire():
    owner = ProcessOwner(
        4242,
        "alice",
        1000,
        "python3",
        5000,
        1_700_000_050,
        "containerd",
        "c" * 64,
        "11111111-2222-3333-4444-555555555555",
        None,
        None,
        None,
    )
    w = HolderWindows()
    w.observe("GPU-0", 0.0, [ResolvedHolder(owner, 1 << 30)])
    [(records, _)] = w.close("GPU-0", 60.0).values()
    device = wire.DeviceWindow(device_id="GPU-0", vendor="nvidia", state="busy", busy_s=60.0, holders=records)
    report = wire.Report(seq=1, start=1_700_000_000, end=1_700_000_060, devices=[device])
    assert wire.check_report(report) is None
    assert msgspec.json.decode(wire.encode(records[0])) == {
        "pid": 4242,
        "user": "alice",
        "uid": 1000,
        "command": "python3",
        "runtime": "containerd",
        "container_id": "c" * 64,
        "pod_uid": "11111111-2222-3333-4444-555555555555",
        "memory_bytes": 1 << 30,
        "held_s": 60.0,
        "since": 1_700_000_050,
    }


def test_accumulator_is_generic_over_other_holder_kinds():
    class Allocation:
        memory_bytes = None

        def __init__(self, pod: str) -> None:
            self.pod = pod

        @property
        def key(self):
            return ("kubernetes", self.pod)

        def window(self, held_s, memory_bytes):
            return wire.HolderWindow(source="kubernetes", pod=self.pod, held_s=held_s)

    w = HolderWindows()
    w.observe("GPU-0", 0.0, [Allocation("train-0"), held(1, 9)])
    w.observe("GPU-0", 45.0, [Allocation("train-0")])
    [(records, _)] = w.close("GPU-0", 60.0).values()
    assert [(r.source, r.pod, r.pid, r.held_s) for r in records] == [
        ("process", None, 1, 45.0),
        ("kubernetes", "train-0", None, 60.0),
    ]
