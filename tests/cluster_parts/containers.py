"""Run a built image the way a pod runs it: uid 1000, a read-only root filesystem, a writable
/tmp (the pod's emptyDir), read-only volumes, the host's network (loopback ports).

With `buildah run --isolation chroot`, which works where no OCI runtime may (inside a
container, as root). Buildah has no read-only flag, so the container's root is bind-mounted
onto itself read-only; the files a runtime binds its own over (/etc/hosts, /etc/resolv.conf,
/etc/hostname, /run/.containerenv) are created first, as they must exist to be bound over.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BUILDAH = ["buildah", "--storage-driver", "vfs"]
REGISTRY = "ghcr.io/baton-dev"
RUNTIME_FILES = ("etc/hosts", "etc/resolv.conf", "etc/hostname", "run/.containerenv")


def image_exists(image: str) -> bool:
    if shutil.which("buildah") is None:
        return False
    return subprocess.run([*BUILDAH, "inspect", "--type", "image", image],
                          capture_output=True).returncode == 0


def _buildah(*args: str) -> str:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


class Container:
    """One container of `image` running `args` (after the image's `baton` entrypoint)."""

    def __init__(self, image: str, args: list[str], tmp: Path,
                 volumes: dict[Path, str] | None = None, log: Path | None = None):
        self.name = _buildah("from", image)
        self.root = None
        self.proc = None
        try:
            self.root = _buildah("mount", self.name)
            for name in RUNTIME_FILES:
                Path(self.root, name).touch()
            for path in ["/tmp", *(volumes or {}).values()]:  # mount points, made as a runtime does
                Path(self.root, path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", self.root, self.root], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", self.root], check=True)
            tmp.mkdir(parents=True, exist_ok=True)
            tmp.chmod(0o1777)
            mounts = ["-v", f"{tmp}:/tmp"]
            for host, path in (volumes or {}).items():
                mounts += ["-v", f"{host}:{path}:ro"]
            self.log = (log or tmp.with_suffix(".log")).open("w")
            self.proc = subprocess.Popen(
                [*BUILDAH, "run", "--isolation", "chroot", "--user", "1000:1000",
                 "--network", "host", *mounts, self.name, "baton", *args],
                stdout=self.log, stderr=subprocess.STDOUT)
        except BaseException:
            self.remove()
            raise

    def running(self) -> bool:
        """True while the command runs; raises with its output once it has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the container exited with {self.proc.returncode}:\n"
                               f"{self.output()[-3000:]}")
        return True

    def process(self, *words: str) -> int:
        """The pid (on the host) of the container's process whose command line holds `words`
        (e.g. a unique port), as the kernel runs it: its uid, mounts and root are the pod's."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if "baton" in " ".join(argv[:2]) and all(w in argv for w in words) \
                    and argv[0] not in BUILDAH:
                return int(entry.name)
        raise LookupError(f"no process with {words} in {self.name}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def remove(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.root is not None:
            subprocess.run(["umount", self.root], capture_output=True)
        subprocess.run([*BUILDAH, "rm", self.name], capture_output=True)
        if self.proc is not None:
            self.log.close()
