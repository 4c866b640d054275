"""Build sandbox root filesystems with debootstrap (``matrix-hpc image build NAME``).

The result is a plain directory under ``cache_dir()/images/NAME``: bubblewrap runs it directly and
Apptainer runs it as a sandbox directory (``apptainer exec DIR ...``). ``containers/NAME.def`` is
the Apptainer definition of the same image, for clusters that prefer a ``.sif``.

Builds are atomic (debootstrap into a temporary sibling, then ``rename``) and cached: a finished
image carries a stamp file with its recipe, and a build with the same recipe is a no-op. A built
image is readable by every user (one install, built once by root, serves them all).

Where no image is built (an ordinary user, no admin), the bwrap runtime falls back to a read-only
view of the node's own ``/usr`` (``hostview``), unless the job asks for the built image only.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matrix_hpc.paths import cache_dir, describe_owner, make_shared_dir, share_tree

from .hostview import HOST, HostView

STAMP = ".matrix-hpc-image.json"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class ImageRecipe:
    """What goes into an image: a Debian suite, a debootstrap variant and extra packages."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    # Commands run inside the new root (chroot) after debootstrap, e.g. cleanup.
    post: tuple[str, ...] = field(default=())
    # Programs the image is for: the node's own view stands in for it only where it has them.
    programs: tuple[str, ...] = field(default=(), compare=False)


RECIPES: dict[str, ImageRecipe] = {
    "python": ImageRecipe(packages=("python3",), post=("apt-get clean", "rm -rf /var/lib/apt/lists/*"),
                          programs=("python3",)),
}


class ImageError(RuntimeError):
    pass


def images_dir() -> Path:
    return cache_dir() / "images"


def image_path(name: str) -> Path:
    return images_dir() / name


def is_built(name: str) -> bool:
    return (image_path(name) / STAMP).is_file()


def host_mirror() -> str:
    """The Debian mirror this machine's apt already uses (deb822 or one-line sources), else the default."""
    candidates = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(d.glob("*.sources")) + sorted(d.glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        # deb822: a stanza with "URIs:" and a "Suites:" naming a plain Debian suite.
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and "debian" in uris.group(1) and "security" not in uris.group(1):
                if any(s in ("bookworm", "trixie", "bullseye", "stable") for s in suites.group(1).split()):
                    return uris.group(1).rstrip("/")
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and "debian" in m.group(1) and "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def build_image(name: str, *, mirror: str | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Build image ``name`` (a key of RECIPES) if it is not built yet; return its directory."""
    if name not in RECIPES:
        raise ImageError(f"unknown image {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    target = image_path(name)
    want = _recipe_record(recipe)
    if not force and _stamp_matches(target, want):
        return target
    make_shared_dir(images_dir())
    # One builder at a time per image (other processes wait, then find it built).
    with open(images_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _stamp_matches(target, want):
            return target
        if shutil.which("debootstrap") is None:
            raise ImageError("debootstrap is not installed (run `make system`, or apt-get install debootstrap)")
        if os.geteuid() != 0:
            raise ImageError("debootstrap needs root; build the image as root or on a machine where you are")
        mirror = mirror or host_mirror()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=images_dir()))
        try:
            cmd = ["debootstrap", f"--variant={recipe.variant}"]
            if recipe.packages:
                cmd.append("--include=" + ",".join(recipe.packages))
            cmd += [recipe.suite, str(tmp), mirror]
            out = subprocess.DEVNULL if quiet else None
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise ImageError(f"debootstrap failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            for step in recipe.post:
                subprocess.run(["chroot", str(tmp), "/bin/sh", "-c", step], check=True, stdout=out)
            # Mount points the sandbox runtimes bind onto.
            for d in ("work", "tmp", "proc", "dev"):
                (tmp / d).mkdir(exist_ok=True)
            (tmp / STAMP).write_text(json.dumps({"name": name, "recipe": want, "mirror": mirror}))
            share_tree(tmp)  # every user runs it, whatever the builder's umask
            if target.exists():
                old = target.with_name(f".{name}.old-{os.getpid()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _recipe_record(recipe: ImageRecipe) -> dict:
    """What the stamp records of a recipe: what changes the image (not ``programs``)."""
    record = asdict(recipe)
    record.pop("programs")
    return record


def _stamp_matches(target: Path, want: dict) -> bool:
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return False
    # JSON turns tuples into lists; compare through the same encoding.
    return stamp.get("recipe") == json.loads(json.dumps(want))


def image_is_named(image: str) -> bool:
    """A name of an image built under the cache (not ``host``, not a path)."""
    return image != HOST and not ("/" in image or image.endswith(".sif") or image.startswith("."))


def resolve_image(image: str, *, base_dir: Path | None = None, runtime: str = "bwrap",
                  fallback: bool = True) -> Path | HostView:
    """An image name (built under the cache), ``host`` (bwrap only: the node's own /usr, read-only),
    or a path (a root filesystem directory or a .sif). A recipe's name that is not built falls back to
    ``host`` with bwrap (unless ``fallback`` is False) where the node has the recipe's programs."""
    if image == HOST:
        if runtime != "bwrap":
            raise ImageError(f"image {HOST!r} (the node's own /usr) is for the bwrap runtime, not {runtime}: "
                             "give a .sif or a built image")
        return HostView()
    if not image_is_named(image):
        p = Path(image).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        if not p.exists():
            raise ImageError(f"image path {p} does not exist")
        return p.resolve()
    p = image_path(image)
    try:
        if is_built(image):
            if not os.access(p, os.R_OK | os.X_OK):
                raise PermissionError(13, "unreadable", str(p))
            return p
    except PermissionError as e:
        bad = Path(e.filename or p)
        raise ImageError(f"image {image!r}: {bad} is not readable by you ({describe_owner(bad)}): ask its owner "
                         f"to run `chmod -R a+rX {p}` (or `matrix-hpc image build {image} --force` as root)") from None
    if image not in RECIPES:
        raise ImageError(f"unknown image {image!r}: give a built image name ({', '.join(sorted(RECIPES))}), "
                         f"{HOST!r} or a path")
    view = HostView()
    if fallback and runtime == "bwrap" and all(view.has(prog) for prog in RECIPES[image].programs):
        return view
    raise ImageError(f"image {image!r} is not built in {images_dir()}: build it as root with "
                     f"`matrix-hpc image build {image}` (or `make image`)"
                     + (f", or use `image: {HOST}` (bwrap: the node's own /usr, read-only)"
                        if runtime == "bwrap" else ""))


def describe_image(image: str, resolved: Path | HostView) -> str:
    """Where a sandbox's root comes from, for the start-up line: the built image, a path, or the view."""
    if isinstance(resolved, HostView):
        why = "" if image == HOST else f"; image {image!r} is not built"
        return f"{resolved.describe()}{why}"
    if image in RECIPES and resolved == image_path(image):
        return f"image {image!r} built at {resolved}"
    return f"image {resolved}"
