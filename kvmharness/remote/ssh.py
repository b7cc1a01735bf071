"""SSH to a rig: the only module of kvmharness that imports paramiko.

What it promises:

* Host keys are checked against known_hosts (the rig's own file, else
  ``~/.ssh/known_hosts``).  An unknown key is refused (paramiko's
  ``RejectPolicy``) unless the caller opted in with ``accept_new_host_keys``,
  which then behaves like OpenSSH's ``StrictHostKeyChecking=accept-new``: the
  key is recorded in that known_hosts file.  A *changed* key is always refused.
* Key authentication only: no agent, no password, no keys guessed from ~/.ssh.
* Nothing secret is ever put in a message (key *file names* and host key
  fingerprints only).
* Every failure is a :class:`RigError` naming the rig and the reason, so one
  broken rig never stops the others.
"""

from __future__ import annotations

import base64
import hashlib
import select
import shlex
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable

import paramiko

from .errors import RigCancelled, RigError, RigTimeout
from .inventory import Rig

__all__ = ["RigConnection", "RemoteProcess", "RigError", "RigTimeout", "RigCancelled", "fingerprint"]

LineSink = Callable[[str, str], None]  # (stream "stdout"|"stderr", line without newline)


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey):
        self.hostname = hostname
        self.key = key
        super().__init__(f"unknown host key for {hostname}")


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


class _RefuseUnknownHostKey(paramiko.RejectPolicy):
    """RejectPolicy, raising an exception we can tell apart from other SSH errors."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(hostname, key)


class _AcceptNewHostKey(paramiko.MissingHostKeyPolicy):
    """Trust a host key seen for the first time and record it (accept-new)."""

    def __init__(self, known_hosts: Path, note: Callable[[str], None]):
        self.known_hosts = known_hosts
        self.note = note

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        self.note(f"accepted new host key {fingerprint(key)} for {hostname}, recorded in {self.known_hosts}")


class RigConnection:
    """One authenticated SSH connection to one rig (a context manager)."""

    def __init__(self, rig: Rig, *, accept_new_host_keys: bool = False,
                 connect_timeout: float = 20.0, note: Callable[[str], None] | None = None):
        self.rig = rig
        self.accept_new = accept_new_host_keys
        self.connect_timeout = connect_timeout
        self.note = note or (lambda msg: None)
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    # -- connecting ------------------------------------------------------------
    def _fail(self, reason: str) -> RigError:
        return RigError(self.rig.name, reason)

    def open(self) -> "RigConnection":
        rig = self.rig
        known = rig.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if not rig.key_file.is_file():
            raise self._fail(f"key file {rig.key_file} does not exist")
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(known)) if known.is_file() else None
        except (OSError, paramiko.SSHException) as e:
            raise self._fail(f"cannot read known_hosts {known}: {e}") from None
        if self.accept_new:
            client.set_missing_host_key_policy(_AcceptNewHostKey(known, self.note))
        else:
            client.set_missing_host_key_policy(_RefuseUnknownHostKey())
        where = f"{rig.host}:{rig.port}"
        try:
            client.connect(rig.host, port=rig.port, username=rig.user, key_filename=str(rig.key_file),
                           allow_agent=False, look_for_keys=False, timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout, auth_timeout=self.connect_timeout)
        except _UnknownHostKey as e:
            client.close()
            raise self._fail(f"unknown host key {fingerprint(e.key)} for {e.hostname} (not in {known}); "
                             "refusing to connect: add the key to known_hosts after checking it, "
                             "or pass --accept-new-host-keys") from None
        except paramiko.BadHostKeyException as e:
            client.close()
            raise self._fail(f"host key MISMATCH for {e.hostname}: {known} has {fingerprint(e.expected_key)}, "
                             f"the server offered {fingerprint(e.key)}; refusing to connect "
                             "(if the rig was reinstalled, remove its old line from known_hosts)") from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise self._fail(f"key file {rig.key_file} is encrypted; use an unencrypted key "
                             "(or a key without passphrase dedicated to the rigs)") from None
        except paramiko.AuthenticationException:
            client.close()
            raise self._fail(f"authentication failed: {rig.user}@{where} refused the key "
                             f"{rig.key_file}") from None
        except paramiko.ssh_exception.NoValidConnectionsError:
            client.close()
            raise self._fail(f"unreachable: connection refused by {where} (no sshd listening?)") from None
        except (socket.timeout, TimeoutError):
            client.close()
            raise self._fail(f"unreachable: no answer from {where} within {self.connect_timeout:g} s") from None
        except paramiko.SSHException as e:
            client.close()
            raise self._fail(f"SSH handshake with {where} failed: {e}") from None
        except (OSError, EOFError) as e:
            client.close()
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise self._fail(f"unreachable: {where}: {why}") from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(10)
        self._client = client
        return self

    def __enter__(self) -> "RigConnection":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
                self._sftp = None
            if self._client is not None:
                self._client.close()
                self._client = None

    @property
    def alive(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def _transport(self) -> paramiko.Transport:
        t = self._client.get_transport() if self._client else None
        if t is None or not t.is_active():
            raise self._fail("connection dropped")
        return t

    # -- commands --------------------------------------------------------------
    def run(self, command: str, *, timeout: float, sink: LineSink | None = None,
            cancel: threading.Event | None = None, pgid_file: str | None = None) -> int:
        """Run ``command`` (a shell command line) and return its exit status.

        Output is handed to ``sink`` line by line as it arrives.  When
        ``pgid_file`` is given, the command's shell records its pid there;
        sshd made that shell a session and process-group leader, so on timeout
        or ``cancel`` every remote process of the session is killed, not just
        our end of the channel: closing a channel without a pty sends no
        signal to the remote side.
        """
        if pgid_file:
            command = f"echo $$ > {shlex.quote(pgid_file)}; {command}"
        try:
            chan = self._transport().open_session(timeout=self.connect_timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._fail(f"connection dropped: cannot start a command ({e or type(e).__name__})") from None
        deadline = time.monotonic() + timeout
        buffers = {"stdout": b"", "stderr": b""}

        def feed(stream: str, data: bytes, final: bool = False) -> None:
            buf = buffers[stream] + data
            *lines, rest = buf.split(b"\n")
            if final and rest:
                lines.append(rest)
                rest = b""
            buffers[stream] = rest
            if sink:
                for line in lines:
                    sink(stream, line.decode("utf-8", "replace").rstrip("\r"))

        try:
            while True:
                progressed = False
                if chan.recv_ready():
                    feed("stdout", chan.recv(65536))
                    progressed = True
                if chan.recv_stderr_ready():
                    feed("stderr", chan.recv_stderr(65536))
                    progressed = True
                if progressed:
                    continue
                # Done once the exit status *and* EOF arrived: sshd may send
                # the status while output is still draining.
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                if chan.closed or not self.alive:
                    break
                if cancel is not None and cancel.is_set():
                    self._kill(pgid_file)
                    raise RigCancelled(self.rig.name, "interrupted; the remote command was killed")
                if time.monotonic() > deadline:
                    self._kill(pgid_file)
                    raise RigTimeout(self.rig.name, f"command did not finish within {timeout:g} s; killed")
                select.select([chan], [], [], 0.2)
            feed("stdout", b"", final=True)
            feed("stderr", b"", final=True)
            status = chan.exit_status if chan.exit_status_ready() else -1
            if status == -1:
                # No exit-status message: either the connection died (paramiko
                # closes the channels a moment before it marks the transport
                # inactive, hence the short wait) or sshd reported an
                # exit-signal, which paramiko does not decode.
                for _ in range(10):
                    if not self.alive:
                        raise self._fail("connection dropped while the command was running")
                    time.sleep(0.1)
                if sink:
                    sink("stderr", "[kvmharness] the remote command was ended by a signal")
                return 255
            return status
        finally:
            chan.close()

    def start(self, command: str) -> "RemoteProcess":
        """Start ``command`` and return at once: a process that lives as long as the
        channel (its stdin reaches EOF when we close it or the connection drops)."""
        try:
            chan = self._transport().open_session(timeout=self.connect_timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._fail(f"connection dropped: cannot start a command ({e or type(e).__name__})") from None
        return RemoteProcess(chan)

    def ping(self, timeout: float) -> bool:
        """True when the rig's sshd answers a fresh channel (``true``) within ``timeout``.

        TCP keepalives prove only that the rig's kernel still ACKs; a frozen sshd
        (or a hung userspace) passes them.  A channel open and an exit status need
        the rig's sshd and a process to run, so they show that it still works.
        """
        try:
            t = self._transport()
            chan = t.open_session(timeout=timeout)
        except paramiko.ChannelException:
            return True  # sshd answered, refusing the channel (e.g. MaxSessions): it is alive
        except (paramiko.SSHException, OSError, EOFError, RigError):
            return False
        try:
            chan.settimeout(timeout)
            chan.exec_command("true")
            deadline = time.monotonic() + timeout
            while not chan.exit_status_ready():
                if time.monotonic() > deadline or chan.closed:
                    return False
                time.sleep(0.05)
            return True
        except (paramiko.SSHException, OSError, EOFError):
            return False
        finally:
            try:
                chan.close()
            except Exception:  # noqa: BLE001 - closing on a dead connection
                pass

    def abort(self) -> None:
        """Drop the connection now, from any thread (a hung rig): blocked calls on it fail."""
        t = self._client.get_transport() if self._client else None
        if t is not None:
            try:
                t.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass

    def output(self, command: str, *, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run a short command; return (status, stdout, stderr)."""
        out: list[str] = []
        err: list[str] = []
        status = self.run(command, timeout=timeout,
                          sink=lambda s, line: (out if s == "stdout" else err).append(line))
        return status, "\n".join(out), "\n".join(err)

    def _kill(self, pgid_file: str | None) -> None:
        """Best effort: TERM, then KILL, the remote process group; a fresh channel."""
        if not pgid_file or not self.alive:
            return
        q = shlex.quote(pgid_file)
        # The recorded pid is the session's shell: sshd made it a session and
        # process-group leader.  Kill by session (pkill -s) as well as by
        # group, because coreutils `timeout` moves itself and the command
        # into a process group of their own.
        script = (f"p=$(cat {q} 2>/dev/null) || exit 0; [ -n \"$p\" ] || exit 0; "
                  f"kill -TERM -- -$p 2>/dev/null; pkill -TERM -s $p 2>/dev/null; "
                  f"for i in 1 2 3 4 5 6 7 8 9 10; do pgrep -s $p >/dev/null 2>&1 || exit 0; sleep 0.5; done; "
                  f"kill -KILL -- -$p 2>/dev/null; pkill -KILL -s $p 2>/dev/null; exit 0")
        try:
            chan = self._transport().open_session(timeout=10)
            chan.exec_command(script)
            chan.settimeout(15)
            chan.recv_exit_status()
            chan.close()
        except Exception:  # noqa: BLE001 - the connection may be gone; nothing more to do
            pass

    # -- files -----------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp() if self._client else None
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise self._fail(f"SFTP unavailable: {e}") from None
            if self._sftp is None:
                raise self._fail("not connected")
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        try:
            self.sftp().put(str(local), remote)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._fail(f"upload of {local.name} to {remote} failed: {e}") from None

    def get_tree(self, remote: str, local: Path) -> list[Path]:
        """Copy remote regular files under ``remote`` (recursively) into ``local``.

        A missing remote directory yields no files (the command may have written none).
        """
        fetched: list[Path] = []
        try:
            sftp = self.sftp()
            try:
                entries = sftp.listdir_attr(remote)
            except FileNotFoundError:
                return fetched
            for e in entries:
                src = f"{remote}/{e.filename}"
                if stat.S_ISDIR(e.st_mode or 0):
                    fetched += self.get_tree(src, local / e.filename)
                elif stat.S_ISREG(e.st_mode or 0):
                    local.mkdir(parents=True, exist_ok=True)
                    sftp.get(src, str(local / e.filename))
                    fetched.append(local / e.filename)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise self._fail(f"download of {remote} failed: {e}") from None
        return fetched


class RemoteProcess:
    """A remote command started with :meth:`RigConnection.start`, read line by line.

    Closing it closes the channel: the remote side sees EOF on its stdin, and so
    does it when the connection drops, so a process that waits for that EOF
    lives exactly as long as our session.
    """

    def __init__(self, chan: paramiko.Channel):
        self._chan = chan
        self._buf = b""

    def readline(self, timeout: float) -> str | None:
        """The next stdout line, "" at EOF, None when none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                return line.decode("utf-8", "replace")
            try:
                if self._chan.recv_ready():
                    data = self._chan.recv(65536)
                    if data:
                        self._buf += data
                        continue
                if self._chan.eof_received or self._chan.closed:
                    if self._chan.recv_ready():
                        continue
                    rest, self._buf = self._buf, b""
                    return rest.decode("utf-8", "replace")
            except (paramiko.SSHException, OSError, EOFError):
                return ""
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            select.select([self._chan], [], [], min(left, 0.2))

    def stderr(self) -> str:
        out = b""
        try:
            while self._chan.recv_stderr_ready():
                out += self._chan.recv_stderr(65536)
        except (paramiko.SSHException, OSError, EOFError):
            pass
        return out.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return not (self._chan.closed or self._chan.exit_status_ready())

    def close(self) -> None:
        try:
            self._chan.shutdown_write()
        except Exception:  # noqa: BLE001 - the connection may be gone
            pass
        try:
            self._chan.close()
        except Exception:  # noqa: BLE001
            pass
