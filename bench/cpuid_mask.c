/* Hide AVX-512, AVX-VNNI and AMX from CPUID, for every thread of a process (an LD_PRELOAD
 * library; bench/cpuid_mask.py builds and documents it).
 *
 * Linux lets a thread make the CPUID instruction fault (arch_prctl(ARCH_SET_CPUID, 0), on CPUs
 * with CPUID faulting: the `cpuid_fault` flag of /proc/cpuinfo). The constructor below turns
 * faulting on before the program's own code runs; threads inherit it, execve resets it (a
 * spawned program loads this library again through LD_PRELOAD). Each CPUID then raises SIGSEGV;
 * the handler turns faulting off for a moment, runs the real instruction, clears the bits of
 * `masks` and steps over the two instruction bytes. Code that picks its kernels from CPUID
 * (oneDNN, ONNX Runtime's MLAS, torch's cpuinfo, LLVM's host query) thus sees an AVX2 CPU.
 *
 * Other SIGSEGVs go to the handler the program installed: sigaction() and signal() are wrapped
 * so that a later SIGSEGV handler (Python's faulthandler, ...) is chained, not installed over
 * this one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

struct mask { uint32_t leaf, subleaf, reg, bits; }; /* reg: 0 eax, 1 ebx, 2 ecx, 3 edx */

static const struct mask masks[] = {
    /* leaf 7.0 EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
    {7, 0, 1, (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31)},
    /* leaf 7.0 ECX: AVX512_VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
    {7, 0, 2, (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14)},
    /* leaf 7.0 EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX_BF16 22, AVX512_FP16 23, AMX_TILE 24, AMX_INT8 25 */
    {7, 0, 3, (1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25)},
    /* leaf 7.1 EAX: AVX_VNNI 4, AVX512_BF16 5, AMX_FP16 21, AVX_IFMA 23 */
    {7, 1, 0, (1u << 4) | (1u << 5) | (1u << 21) | (1u << 23)},
    /* leaf 7.1 EDX: AVX_VNNI_INT8 4, AVX_NE_CONVERT 5, AMX_COMPLEX 8, AVX_VNNI_INT16 10, AVX10 19 */
    {7, 1, 3, (1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19)},
    /* leaf 0xD.0 EAX (state components XCR0 may hold): opmask 5, ZMM_Hi256 6, Hi16_ZMM 7, XTILECFG 17, XTILEDATA 18 */
    {0xD, 0, 0, (1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18)},
};

static volatile unsigned long trapped; /* CPUIDs answered (rmsmp_cpuid_mask_count) */
static struct sigaction chained;       /* the program's own SIGSEGV handler */
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

unsigned long rmsmp_cpuid_mask_count(void) { return trapped; }

static void real_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(subleaf));
}

static int faulting(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = (ucontext_t *)ctx_;
    greg_t *g = ctx->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (ip && ip[0] == 0x0F && ip[1] == 0xA2) {
        uint32_t leaf = (uint32_t)g[REG_RAX], subleaf = (uint32_t)g[REG_RCX], r[4];
        faulting(0);
        real_cpuid(leaf, subleaf, r);
        faulting(1);
        for (size_t i = 0; i < sizeof masks / sizeof masks[0]; i++)
            if (masks[i].leaf == leaf && masks[i].subleaf == subleaf) r[masks[i].reg] &= ~masks[i].bits;
        if (leaf == 0x24) r[0] = r[1] = r[2] = r[3] = 0; /* AVX10 leaf */
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        __atomic_add_fetch(&trapped, 1, __ATOMIC_RELAXED);
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, ctx_);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else { /* default action: restore it, the faulting instruction runs again and ends the process */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV) return real_sigaction(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction act;
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    memset(&act, 0, sizeof act);
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&act.sa_mask);
    real_sigaction(SIGSEGV, &act, NULL);
    memset(&chained, 0, sizeof chained);
    chained.sa_handler = SIG_DFL;
    faulting(1); /* where the CPU or kernel cannot fault on CPUID this fails: the Python side checks */
}

/* The CPUID instruction as this process sees it (masked where faulting is on): for the checks. */
void rmsmp_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out) { real_cpuid(leaf, subleaf, out); }

/* 1 where CPUID faults in the calling thread (the mask is active), 0 where not, -1 on error. */
int rmsmp_cpuid_faulting(void) {
    long on = syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0);
    return on < 0 ? -1 : on == 0;
}
