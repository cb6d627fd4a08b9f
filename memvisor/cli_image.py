"""The image commands: `memvisor image build | import | ls | rm | info` (thin: parse, call memvisor/image)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from memvisor.errors import MemvisorError


def add_parsers(sub: Any) -> None:
    """`memvisor image ...`, on the top-level parser's subparsers."""
    image = sub.add_parser("image", help="build, import and list images (docs/image.md)")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    image_build = image_sub.add_parser(
        "build", help="build memvisor's guest image, or with --name an image of yours (cached by content)",
        description="Without --name: build memvisor's own guest image (kernel, shared root). With --name: build an "
        "image of yours from Debian packages (dependencies resolved by apt), pip requirements and files, on top of "
        "the default image's Debian userland. Flags add to the [image] table of --config.")
    image_build.add_argument("--name", help="the image's name (lower-case letters, digits, . _ -)")
    image_build.add_argument("--package", action="append", default=[], metavar="PKG",
                             help="a Debian package to install, with its dependencies (repeatable)")
    image_build.add_argument("--pip", action="append", default=[], metavar="REQ",
                             help="a pip requirement to install for the guest's Python, wheels only (repeatable)")
    image_build.add_argument("--requirements", type=Path, metavar="FILE", help="a pip requirements file")
    image_build.add_argument("--copy", action="append", default=[], metavar="SRC:DEST",
                             help="copy a host file or directory to DEST in the image (repeatable)")
    image_build.add_argument("--rebuild", action="store_true",
                             help="build even if an identical image exists (e.g. to pick up new versions of unpinned "
                                  "pip requirements)")
    image_build.add_argument("--json", action="store_true", help="print the image as JSON")
    image_import = image_sub.add_parser(
        "import", help="import an OCI image (layout directory, or archive from skopeo/buildah/docker/podman)")
    image_import.add_argument("path", type=Path, help="OCI layout directory or image archive (.tar)")
    image_import.add_argument("--name", required=True, help="the image's name")
    image_import.add_argument("--max-size", type=int, default=8192, metavar="MIB",
                              help="refuse an image whose files declare more than this (default 8192 MiB)")
    image_import.add_argument("--json", action="store_true", help="print the image as JSON")
    image_ls = image_sub.add_parser("ls", help="list your images")
    image_ls.add_argument("--json", action="store_true", help="print JSON")
    image_rm = image_sub.add_parser("rm", help="remove an image of yours (running sandboxes keep theirs)")
    image_rm.add_argument("name")
    image_info = image_sub.add_parser("info", help="show memvisor's guest image")
    image_info.add_argument("--json", action="store_true", help="print the image manifest as JSON")


def cmd_image(args: argparse.Namespace, con: Any) -> int:
    from memvisor.image import build, store

    if args.image_command in ("import", "ls", "rm") or (args.image_command == "build" and (
            args.name or args.package or args.pip or args.requirements or args.copy)):
        return cmd_user_image(args, con)
    if args.image_command == "build":
        with con.progress("building guest image") as progress:
            image = build.build(rebuild=args.rebuild, progress=progress)
    else:
        found = build.find()
        if found is None:
            raise MemvisorError("no guest image is built for this memvisor", hint="run `memvisor image build`")
        image = found
    if args.json:
        print(json.dumps({"path": str(image.path), **image.manifest}, indent=2))
        return 0
    m = image.manifest
    sizes = m["sizes"]
    print(f"image:      {image.path}")
    print(f"kernel:     {m['kernel_version']} (vmlinux {sizes['vmlinux'] / 2**20:.1f} MiB)")
    print(f"shared root: {sizes['rootfs.erofs'] / 2**20:.1f} MiB erofs, {m['rootfs_files']} files "
          f"(stage 0 {sizes['stage0.cpio'] / 2**20:.1f} MiB)")
    print(f"initramfs:  {sizes['initramfs.cpio'] / 2**20:.1f} MiB, {m['initramfs_files']} files (--rootfs initramfs)")
    print(f"packages:   {', '.join(f'{k} {v}' for k, v in m['packages'].items())}")
    print(f"built:      {m['built_at']} in {m['build_seconds']} s")
    print(f"your images: {len(store.ls())} (`memvisor image ls`)")
    return 0


def cmd_user_image(args: argparse.Namespace, con: Any) -> int:
    from memvisor.image import oci, store, userbuild

    if args.image_command == "ls":
        images = store.ls()
        if args.json:
            print(json.dumps([i.to_json() for i in images], indent=2))
        elif not images:
            con.notice("no images yet: `memvisor image build --name NAME --package PKG` or "
                       "`memvisor image import ARCHIVE --name NAME`")
        else:
            print(f"{'NAME':24} {'SIZE':>9} {'SOURCE':8} {'CREATED':20} KEY")
            for i in images:
                print(f"{i.name:24} {i.size / 2**20:8.1f}M {i.source.get('kind', '?'):8} {i.created:20} "
                      f"{i.key[:12]}")
        return 0
    if args.image_command == "rm":
        store.rm(args.name)
        con.notice(f"removed image {args.name}")
        return 0
    if args.image_command == "import":
        if args.max_size < 1:
            raise MemvisorError(f"--max-size {args.max_size} must be at least 1 MiB")
        with con.progress(f"importing {args.path}") as progress:
            image = oci.import_image(args.path, args.name, max_bytes=args.max_size << 20, progress=progress)
    else:
        spec = userbuild.BuildSpec.from_sources(name=args.name, packages=args.package, pip=args.pip,
                                                requirements=args.requirements, copies=args.copy,
                                                config=args.config)
        with con.progress(f"building image {spec.name}") as progress:
            image = userbuild.build_image(spec, progress, rebuild=args.rebuild)
    if args.json:
        print(json.dumps(image.to_json(), indent=2))
    else:
        print(f"{image.name}: {image.size / 2**20:.1f} MiB, key {image.key[:12]}; run it with "
              f"`memvisor run --image {image.name} -- CMD`")
    return 0
