"""The machine this process runs on, as a TVM target, and what it can run.

LLVM names the host CPU (``llvm_get_system_cpu``), but a target built from that name alone
carries the name's default feature list, not the host's: an Intel Xeon with AMX-INT8,
AVX-VNNI and AVX512-FP16 is named ``rocketlake``, whose list has none of the three. The
host target therefore also carries ``mattr``: the difference between LLVM's own host feature
query (``getHostCPUFeatures``, what ``clang -march=native`` uses) and the name's list, so
``target_has_features("amx-int8", target)`` tells the truth on every host, AMD or Intel,
with or without AVX-512, and nothing here is hard-coded per CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = ["host_cpu_target", "host_cpu_features", "host_triple", "triple_arch", "cpu_part", "target_triple",
           "target_cpu_features", "missing_host_features"]

#: x86 features whose instructions LLVM emits only through their own intrinsics, never for
#: the arithmetic a compiled model does; a host without them (e.g. ``pku``, which the OS
#: may leave disabled on a CPU that has it) still runs a library whose CPU lists them.
SYSTEM_ONLY_FEATURES = frozenset({
    "pku", "sgx", "shstk", "pconfig", "wbnoinvd", "enqcmd", "uintr", "hreset", "ptwrite", "waitpkg",
    "invpcid", "kl", "widekl", "usermsr", "tsxldtrk", "rtm", "serialize", "cldemote", "movdiri", "movdir64b",
    "clzero", "mwaitx", "rdpru", "lwp",
})

_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "i386": "x86", "i486": "x86",
                 "i586": "x86", "i686": "x86"}


def host_triple() -> str:
    """LLVM's triple for this machine (e.g. ``x86_64-conda-linux-gnu``)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def triple_arch(triple: str) -> str:
    """The architecture of an LLVM triple, aliases folded (``arm64`` -> ``aarch64``)."""
    arch = str(triple).split("-", 1)[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


@functools.lru_cache(maxsize=None)
def _host_feature_map() -> Tuple[Tuple[str, bool], ...]:
    try:
        import tvm_ffi

        query = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures", allow_missing=True)
    except Exception:  # noqa: BLE001 - an older FFI without allow_missing, or no LLVM: no host query
        query = None
    if query is None:
        return ()
    return tuple(sorted((str(k), bool(v)) for k, v in dict(query()).items()))


def host_cpu_features() -> Dict[str, bool]:
    """LLVM's view of this CPU's ISA features: name -> present (``{}`` where LLVM cannot tell).
    Features absent from the map are not ISA features LLVM detects (e.g. tuning flags)."""
    return dict(_host_feature_map())


def _features_of(target_dict: Dict[str, object]) -> set:
    import tvm
    from tvm.target import codegen

    return set(codegen.llvm_get_cpu_features(tvm.target.Target(target_dict)))


@functools.lru_cache(maxsize=None)
def _host_mcpu_mattr() -> Tuple[str, Tuple[str, ...]]:
    from tvm.target import codegen

    cpu = str(codegen.llvm_get_system_cpu())
    host = host_cpu_features()
    if not host:
        return cpu, ()
    named = _features_of({"kind": "llvm", "mcpu": cpu})
    # only what differs from the name's list, removals first (a later "+" re-enables what a "-" implied off)
    mattr = [f"-{f}" for f, on in sorted(host.items()) if not on and f in named]
    mattr += [f"+{f}" for f, on in sorted(host.items()) if on and f not in named]
    got = _features_of({"kind": "llvm", "mcpu": cpu, **({"mattr": mattr} if mattr else {})})
    if any((f in got) != on for f, on in host.items()):
        # the difference did not reproduce the host (a feature implying another): state every feature
        mattr = [f"-{f}" for f, on in sorted(host.items()) if not on] + [f"+{f}" for f, on in sorted(host.items()) if on]
    return cpu, tuple(mattr)


def host_cpu_target() -> Dict[str, object]:
    """The machine this runs on: LLVM with its CPU model and, where that model's feature list
    differs from the host's, the host's features as ``mattr``, so the kernels use its vector ISA."""
    cpu, mattr = _host_mcpu_mattr()
    target: Dict[str, object] = {"kind": "llvm", "mcpu": cpu}
    if mattr:
        target["mattr"] = list(mattr)
    target["num-cores"] = os.cpu_count() or 1
    return target


def cpu_part(target) -> "object":
    """The LLVM part of a ``tvm.target.Target``: itself for an ``llvm`` target, else its host
    (TVM's default ``llvm`` host where it names none)."""
    import tvm

    if target.kind.name == "llvm":
        return target
    if target.host is not None:
        return target.host
    return tvm.target.Target({"kind": "llvm"})


def target_triple(cpu_target) -> str:
    """The triple an LLVM target compiles for (its ``mtriple``, else this machine's)."""
    triple = cpu_target.attrs.get("mtriple") if cpu_target.kind.name == "llvm" else None
    return str(triple) if triple else host_triple()


def target_cpu_features(cpu_target) -> List[str]:
    """Every LLVM feature an LLVM target enables (its CPU's list with ``mattr`` applied),
    tuning flags included, sorted."""
    from tvm.target import codegen

    return sorted(str(f) for f in codegen.llvm_get_cpu_features(cpu_target))


def missing_host_features(features: Iterable[str], host: Optional[Dict[str, bool]] = None) -> List[str]:
    """The ISA features in ``features`` that this CPU lacks, as LLVM's host query sees them.

    Names the query does not report (tuning flags such as ``fast-gather``) are not ISA
    features and never missing; nor are :data:`SYSTEM_ONLY_FEATURES`. Empty where LLVM
    cannot query this host."""
    host = host_cpu_features() if host is None else host
    return sorted({f for f in features if host.get(f) is False and f not in SYSTEM_ONLY_FEATURES})
