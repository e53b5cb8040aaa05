"""Does a refactor leave the machine code alone? Compiles kernel variants with this checkout and
with a git revision (NVRTC only: no GPU needed) and compares the code sections of the cubins.

    python3 bench/sass_diff.py HEAD~1                          # every variant, sm_80 and sm_90a
    python3 bench/sass_diff.py HEAD~1 --file flash_fwd_sm90.cu flash_bwd_sm90.cu

Each variant the dispatcher can pick (plan.forward_variants, plan.backward_variants) is built by
both revisions' compile layers, for sm_90a (the Hopper kernels) or for each --arch (the portable
ones); a variant that turns on a switch the revision lacks is skipped. The kernels this
checkout's program launches are compared (a kernel a program no longer builds is not); equal
.text sections mean equal SASS. Prints one line per differing program and
"identical: N of M" last; exits 1 if any differs. The revision's cuflash/ and cuda_src/ are
extracted as bench/ab.py does.
"""
import argparse
import dataclasses
import os
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def code_sections(cubin):
    """{section name: bytes} of a cubin's machine code (its ELF .text.<kernel> sections)."""
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(offset):
        end = cubin.index(b"\0", names_at + offset)
        return cubin[names_at + offset:end].decode()

    return {name(h[0]): cubin[h[4]:h[4] + h[5]] for h in headers if name(h[0]).startswith(".text.")}


def translate(variant, other):
    """The same variant as an object of the other build's plan module, or None where it turns on
    a switch (a field off by default) that the other build lacks: such a variant has no
    counterpart there."""
    tile = getattr(other.plan, type(variant.tile).__name__)(**dataclasses.asdict(variant.tile))
    fields = {f.name: getattr(variant, f.name) for f in dataclasses.fields(variant)}
    known = {f.name for f in dataclasses.fields(getattr(other.plan, type(variant).__name__))}
    defaults = {f.name: f.default for f in dataclasses.fields(variant)}
    if any(fields[name] != defaults[name] for name in fields if name not in known):
        return None
    return getattr(other.plan, type(variant).__name__)(**{**{k: v for k, v in fields.items() if k in known}, "tile": tile})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="git revision to compare this checkout with")
    parser.add_argument("--file", nargs="+", help="only programs of these cuda_src files")
    parser.add_argument("--arch", nargs="+", default=("sm_80", "sm_90a"), help="targets of the portable kernels")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    os.environ["CUFLASH_CACHE_DIR"] = tempfile.mkdtemp(prefix="cuflash-sass-diff-")

    import ab
    import cuflash
    from cuflash import compile as compile_, plan

    with tempfile.TemporaryDirectory() as folder:
        old = ab.extract(args.rev, "cuflash_old", folder)
        jobs = []
        for variant in plan.forward_variants() + plan.backward_variants():
            make = "forward_program" if isinstance(variant, plan.FwdVariant) else "backward_program"
            counterpart = translate(variant, old)
            if counterpart is None:
                continue
            new_program = getattr(compile_, make)(variant)
            old_program = getattr(old.compile, make)(counterpart)
            if args.file and new_program.file not in args.file:
                continue
            for arch in (new_program.arch,) if new_program.arch else args.arch:
                jobs.append((new_program, old_program, arch))
        jobs = list(dict.fromkeys(jobs))

        def compare(job):
            new_program, old_program, arch = job
            launched = {f".text.{name}" for name in new_program.names}
            ours = {k: v for k, v in code_sections(compile_.binary(new_program, arch)).items() if k in launched}
            theirs = {k: v for k, v in code_sections(old.compile.binary(old_program, arch)).items() if k in launched}
            return job, ours == theirs and len(ours) == len(launched), sum(map(len, ours.values()))

        same = 0
        with ThreadPoolExecutor(max(1, args.threads)) as pool:
            for (program, _, arch), equal, size in pool.map(compare, jobs):
                same += equal
                if not equal:
                    print(f"DIFFERENT {program.file} {arch} {dict(program.defines)} ({size} bytes of code)", flush=True)
    print(f"identical: {same} of {len(jobs)} (cuflash {cuflash.__version__} here vs {args.rev})")
    return 0 if same == len(jobs) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
