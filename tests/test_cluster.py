"""`ray up` / `ray down` with the committed cluster.yaml, over a real sshd on 127.0.0.1.

The head runs as a dedicated unprivileged user (``raycluster``): ``ray down`` runs a bare ``ray stop`` on the
node, and as that user it cannot signal root's Ray clusters (the test stack, a developer's stack, the
benchmarks'), which this test checks. Needs root (creates the user, runs sshd on port 22) and the system
packages of ``scripts/system_deps.sh`` (openssh-server, rsync, make).

The test copy of cluster.yaml differs from the committed one only where it must: the ssh user and key, its
own cluster name and ports (so a developer's ``ray up`` on this machine is left alone), and the venv. The
project venv lives under a directory other users may not enter (pyenv under /root), so the user gets a tiny
venv of a system Python 3.11 that reuses the project venv's site-packages through a .pth file; the
Makefile's stamp in it makes ``make install`` a no-op instead of a 7 GB install.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from lib.ops.preflight import SINGLE_NODE_VARIABLE, use_stack_ray
from lib.ops.stack import _stop_group, port_in_use
from lib.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow

USER = "raycluster"
GECOS = "rakuten-mlops tests/test_cluster.py"
CLUSTER_NAME = "rakuten-test"
WORK = Path("/tmp/rakuten-test-cluster")  # fixed, so a re-run finds what a crashed run left behind
VENV_BIN = Path(sys.executable).parent
SSH_PORT = 22  # Ray's local provider has no ssh port option
# cluster.yaml port → test port (the committed ones stay free for a developer's cluster).
PORTS = {"6390": "26390", "6391": "26391", "8275": "28275", "8276": "28276"}
DASHBOARD = f"http://127.0.0.1:{PORTS['8275']}"
NODE_VENV = "$HOME/rakuten-mlops/.venv"  # the venv cluster.yaml's commands use on a node
NODE_FILES = ("rakuten-mlops", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem", ".rakuten-test-venv",
              ".ray")  # fmt: skip
NODE_TOKEN = "~/.ray/auth_token"  # cluster.yaml's file mount of the launcher's Ray token


def _sh(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def _as_user(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return _sh("runuser", "-u", USER, "--", *cmd, timeout=timeout, check=False)


def _user_processes(uid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def _kill_user_processes(uid: int) -> None:
    """Leftovers of the dedicated test user (a crashed run): only that user's processes, by pid."""
    procs = _user_processes(uid)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def _stop_stale_sshd() -> None:
    """An sshd a crashed run left (its pid file, and its command line names our config)."""
    pid_file = WORK / "sshd.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, psutil.NoSuchProcess):
        proc = psutil.Process(int(pid_file.read_text().split()[0]))
        if str(WORK / "sshd_config") in proc.cmdline():
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    pid_file.unlink(missing_ok=True)


def _ensure_user() -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        _sh("useradd", "--create-home", "--shell", "/bin/bash", "--comment", GECOS, USER)
        entry = pwd.getpwnam(USER)
    if entry.pw_gecos != GECOS:
        pytest.fail(f"user {USER} exists but was not created by this test (GECOS {entry.pw_gecos!r})")
    # A locked password ("!") makes sshd refuse even key logins when UsePAM is off; "*" = no password.
    _sh("usermod", "--password", "*", USER)
    return entry


def _write_owned(path: Path, data: bytes, user: pwd.struct_passwd, mode: int = 0o644) -> None:
    path.write_bytes(data)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)


def _python_for(user: pwd.struct_passwd) -> str:
    """A Python 3.11 interpreter the user can run (the project's may sit under /root)."""
    candidates = [os.path.realpath(sys._base_executable), "/usr/bin/python3.11", "/usr/local/bin/python3.11"]
    for candidate in candidates:
        probe = _as_user(candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 11))")
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    pytest.fail(f"no Python 3.11 that user {USER} may run among {candidates}")


def _reuse_venv(user: pwd.struct_passwd) -> Path:
    """A venv for the user whose packages are the project venv's (through a .pth file)."""
    venv = Path(user.pw_dir) / ".rakuten-test-venv"
    made = _as_user(_python_for(user), "-m", "venv", "--without-pip", "--clear", str(venv))
    assert made.returncode == 0, made.stderr
    site_packages = venv / "lib" / "python3.11" / "site-packages"
    project_site = sysconfig.get_paths()["purelib"]
    reuse = f"import site; site.addsitedir({project_site!r})\n"
    _write_owned(site_packages / "_rakuten_reuse.pth", reuse.encode(), user)
    # The `ray` console script, pointed at this venv's interpreter.
    script = (VENV_BIN / "ray").read_text().split("\n", 1)[1]
    _write_owned(venv / "bin" / "ray", f"#!{venv}/bin/python\n{script}".encode(), user, 0o755)
    _write_owned(venv / ".installed", b"", user)  # the Makefile's stamp: `make install VENV=...` is a no-op
    probe = _as_user(str(venv / "bin" / "python"), "-c", "import ray, lib.settings, jobs.pipeline")
    if probe.returncode != 0:
        # E.g. a checkout under /root (mode 700): the unprivileged node user cannot read the code or venv.
        pytest.skip(f"project venv {project_site} unreadable for an unprivileged user:\n{probe.stderr}")
    return venv


def _test_config(key: Path, venv: Path, token: Path) -> dict:
    """cluster.yaml with the test's user, key, cluster name, ports, venv and Ray token (the test stack's,
    which this process's Ray client sends); fails if it no longer matches."""
    config = yaml.safe_load((PROJECT_ROOT / "cluster.yaml").read_text())
    assert config["file_mounts"].get(NODE_TOKEN) == NODE_TOKEN, "cluster.yaml no longer ships the Ray token"
    config["file_mounts"][NODE_TOKEN] = str(token)
    swaps = {NODE_VENV: str(venv), "make install": f"make install VENV={venv}"}
    swaps |= {f"={port}": f"={test}" for port, test in PORTS.items()} | {":6390": f":{PORTS['6390']}"}
    used = dict.fromkeys(swaps, 0)

    def swap(command: str) -> str:
        for old, new in swaps.items():
            used[old] += command.count(old)
            command = command.replace(old, new)
        return command

    for section in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        config[section] = [swap(c) for c in config[section]]
    assert all(used.values()), f"cluster.yaml changed: the test no longer finds {used}"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("ray stop" in c for c in starts), "a bare `ray stop` would stop every Ray on the node"
    assert all("RAY_AUTH_MODE=token" in c for c in starts), "every node must ask clients for the Ray token"
    config["cluster_name"] = CLUSTER_NAME
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    return config


def _run(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int, str]:
    """Run a command in its own process group (killed whole on timeout); returns (exit code, log tail)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=PROJECT_ROOT, start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_group(psutil.Process(proc.pid), 5)
            code = -1
    return code, log.read_text(errors="replace")[-4000:]


def _wait_for(predicate, timeout_s: float, poll_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def _start_sshd(user: pwd.struct_passwd, pubkey: str) -> subprocess.Popen | None:
    """Our own sshd on 127.0.0.1:22 (None when another sshd there already accepts the key)."""
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, user.pw_uid, user.pw_gid)
    _write_owned(ssh_dir / "authorized_keys", pubkey.encode(), user, 0o600)
    probe = [
        "ssh", "-i", str(WORK / "id_ed25519"), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", f"{USER}@127.0.0.1", "true",
    ]  # fmt: skip
    if port_in_use("127.0.0.1", SSH_PORT):
        if _sh(*probe, check=False).returncode == 0:
            return None
        pytest.fail(f"port {SSH_PORT} on 127.0.0.1 is taken by an ssh server that refuses {USER}'s key")
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(WORK / "ssh_host_ed25519_key"))
    (WORK / "sshd_config").write_text(
        f"Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {WORK / 'ssh_host_ed25519_key'}\n"
        f"PidFile {WORK / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PubkeyAuthentication yes\nUsePAM no\nPermitRootLogin no\nAllowUsers {USER}\n"
        "AuthorizedKeysFile .ssh/authorized_keys\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    check = _sh(sshd, "-t", "-f", str(WORK / "sshd_config"), check=False)
    assert check.returncode == 0, check.stderr
    with (WORK / "sshd.log").open("ab") as log:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(WORK / "sshd_config")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    if not _wait_for(lambda: _sh(*probe, check=False).returncode == 0, 30):
        _stop_group(psutil.Process(proc.pid), 5)
        pytest.fail(f"sshd did not accept the key: {(WORK / 'sshd.log').read_text()[-2000:]}")
    return proc


def _submit_tiny_job() -> tuple[str, str]:
    """A job with the project's runtime env: the user it ran as and a task's result, in its logs."""
    from ray.job_submission import JobSubmissionClient

    from jobs.submit import wait

    runtime_env = yaml.safe_load((PROJECT_ROOT / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(PROJECT_ROOT)
    client = JobSubmissionClient(DASHBOARD)
    entrypoint = (
        'python -c "import getpass, ray, lib.settings; ray.init(); '
        "print('cluster-job', getpass.getuser(), ray.get(ray.remote(lambda: 6 * 7).remote()))\""
    )
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=f"test-cluster-{uuid.uuid4().hex[:8]}"
    )
    return wait(client, job_id, timeout_s=300), client.get_job_logs(job_id)


def _sentinel() -> subprocess.Popen:
    """A root process named like a Ray process (``raylet``), which ``ray stop`` targets by name: it must
    survive ``ray down`` (as it does the Ray clusters of root on this machine)."""
    (WORK / "raylet").symlink_to(shutil.which("sleep") or "/bin/sleep")
    return subprocess.Popen([str(WORK / "raylet"), "1800"], start_new_session=True)


def _cleanup_node(home: Path, saved: dict[str, bytes | None], user: pwd.struct_passwd) -> None:
    """Put back the user's files as they were; remove what `ray up` left on the node."""
    for name, content in saved.items():
        path = home / name
        if content is None:
            path.unlink(missing_ok=True)
        else:
            _write_owned(path, content, user, 0o600 if name.startswith(".ssh") else 0o644)
    for name in NODE_FILES:
        target = home / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    # The head autoscaler's state (kept in the default Ray temp dir, as the user).
    for suffix in ("state", "lock"):
        Path(f"/tmp/ray/cluster-{CLUSTER_NAME}.{suffix}").unlink(missing_ok=True)


def test_ray_up_job_and_ray_down_as_unprivileged_user(stack):
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a user, runs sshd on 127.0.0.1:22 and `ray up` as that user")
    for tool in ("rsync", "ssh", "make"):
        assert shutil.which(tool), f"{tool} missing: run `bash scripts/system_deps.sh`"
    user = _ensure_user()
    home = Path(user.pw_dir)
    _stop_stale_sshd()
    _kill_user_processes(user.pw_uid)
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(f"/tmp/ray-{USER}", ignore_errors=True)  # the node's Ray files of an earlier run
    WORK.mkdir(mode=0o700)
    saved = {name: (home / name).read_bytes() if (home / name).exists() else None
             for name in (".bashrc", ".ssh/authorized_keys")}  # fmt: skip
    env = {
        # This process joins the local stack's Ray as a single-node client; `ray up` is for another cluster.
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != SINGLE_NODE_VARIABLE},
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # The launcher's cluster state away from /tmp/ray, where the head's autoscaler (as USER) keeps its.
        "RAY_TMPDIR": str(WORK / "launcher"),
    }  # fmt: skip
    config_path = WORK / "cluster.yaml"
    ray_up = [str(VENV_BIN / "ray"), "up", "-y", str(config_path), "--no-config-cache"]
    ray_down = [str(VENV_BIN / "ray"), "down", "-y", str(config_path)]
    sshd = sentinel = None
    cluster_up = False
    try:
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rakuten-test-cluster",
            "-f", str(WORK / "id_ed25519"))  # fmt: skip
        sshd = _start_sshd(user, (WORK / "id_ed25519.pub").read_text())
        venv = _reuse_venv(user)
        use_stack_ray(stack)  # this process's Ray client sends the test stack's token, shipped to the node
        token = stack.ray_auth_token_path
        config = _test_config(WORK / "id_ed25519", venv, token)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        sentinel = _sentinel()

        t0 = time.monotonic()
        cluster_up = True
        code, tail = _run(ray_up, WORK / "ray-up.log", env, timeout=900)
        assert code == 0, f"ray up failed ({code}):\n{tail}"
        print(f"\nray up: {time.monotonic() - t0:.0f} s")
        synced = home / "rakuten-mlops"
        assert (synced / "lib" / "settings.py").exists() and (synced / "Makefile").exists()
        assert not list(synced.rglob("__pycache__")), "rsync_exclude did not apply"
        assert (home / ".bashrc").read_text().startswith(f"export PATH={venv}/bin:$PATH\n")
        node_token = home / ".ray" / "auth_token"
        assert node_token.read_bytes() == token.read_bytes() and node_token.stat().st_mode & 0o077 == 0
        refused = httpx.get(f"{DASHBOARD}/api/jobs/", timeout=10)  # a client without the token
        assert refused.status_code == 401, refused.text

        t0 = time.monotonic()
        status, logs = _submit_tiny_job()
        assert status == "SUCCEEDED", logs
        assert f"cluster-job {USER} 42" in logs, logs
        print(f"job: {time.monotonic() - t0:.0f} s")

        # `ray up` again: the running head is left alone (no `ray stop` in the start commands).
        t0 = time.monotonic()
        code, tail = _run(ray_up, WORK / "ray-up-again.log", env, timeout=600)
        assert code == 0, f"second ray up failed ({code}):\n{tail}"
        assert "Ray already runs on this node" in (WORK / "ray-up-again.log").read_text(errors="replace")
        assert (home / ".bashrc").read_text().count(f"export PATH={venv}/bin:$PATH\n") == 1
        print(f"ray up again: {time.monotonic() - t0:.0f} s")

        t0 = time.monotonic()
        code, tail = _run(ray_down, WORK / "ray-down.log", env, timeout=300)
        assert code == 0, f"ray down failed ({code}):\n{tail}"
        cluster_up = False
        # Really down: ports closed and nothing of the user left (ssh multiplexing lingers ~10 s).
        assert _wait_for(lambda: not port_in_use("127.0.0.1", int(PORTS["8275"])), 60), tail
        assert _wait_for(lambda: not port_in_use("127.0.0.1", int(PORTS["6390"])), 60), tail
        assert _wait_for(lambda: not _user_processes(user.pw_uid), 90), (
            f"left running as {USER}: {[p.cmdline() for p in _user_processes(user.pw_uid)]}"
        )
        print(f"ray down: {time.monotonic() - t0:.0f} s")
        # ...while its bare `ray stop` could not touch root's processes.
        assert sentinel.poll() is None, "ray down's `ray stop` killed a root process"
    finally:
        if cluster_up:  # best effort after a failure; the user's leftovers are killed below anyway
            _run(ray_down, WORK / "ray-down.log", env, 300)
        for proc in (sshd, sentinel):
            if proc is not None and proc.poll() is None:
                _stop_group(psutil.Process(proc.pid), 10)
        _kill_user_processes(user.pw_uid)
        _cleanup_node(home, saved, user)
