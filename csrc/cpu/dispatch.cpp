// Baseline-compiled: detects what the CPU supports and holds the kernel in use.
#include "cpu/dispatch.h"

#include <atomic>

#if defined(FASTATTN_X86_KERNELS)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastattn {
namespace {

using Kernel = void (*)(const AttentionParams&);

struct Isa {
  const char* name;
  Kernel kernel;
  bool (*supported)();
};

bool always() { return true; }

#if defined(FASTATTN_X86_KERNELS)
// libgcc's checks include the OS saving the wider registers (XGETBV), not only CPUID.
// F16C (half-precision conversion) came with Ivy Bridge, before AVX2: every AVX2 CPU has it.
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
// The AVX-512 file is compiled with F, BW, VL and DQ: the compiler may use any of them.
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
// AMX: the CPU has AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24, 22), the OS saves the tile state
// (XCR0 bits 17, 18), and Linux grants this process the tile data state, which it must ask for once.
bool cpu_has_amx() {
  if (!cpu_has_avx512bf16()) return false;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
  unsigned xcr0_low, xcr0_high;
  __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if ((xcr0_low & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
  constexpr int kArchRequestXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}
constexpr Isa kIsas[] = {
    {"scalar", generic::attention_forward, always},
    {"avx2", avx2::attention_forward, cpu_has_avx2},
    {"avx512", avx512::attention_forward, cpu_has_avx512},
    {"avx512bf16", avx512bf16::attention_forward, cpu_has_avx512bf16},
    {"amx", amx::attention_forward, cpu_has_amx},
};
#else
constexpr Isa kIsas[] = {{"scalar", generic::attention_forward, always}};
#endif

const Isa* best_isa() {
  const Isa* best = &kIsas[0];
  for (const Isa& isa : kIsas)
    if (isa.supported()) best = &isa;
  return best;
}

std::atomic<const Isa*>& current() {
  static std::atomic<const Isa*> isa{best_isa()};
  return isa;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : kIsas)
    if (isa.supported()) names.emplace_back(isa.name);
  return names;
}

std::vector<std::pair<std::string, bool>> cpu_features() {
#if defined(FASTATTN_X86_KERNELS)
  return {{"sse2", bool(__builtin_cpu_supports("sse2"))},
          {"avx", bool(__builtin_cpu_supports("avx"))},
          {"avx2", bool(__builtin_cpu_supports("avx2"))},
          {"fma", bool(__builtin_cpu_supports("fma"))},
          {"f16c", bool(__builtin_cpu_supports("f16c"))},
          {"avx512f", bool(__builtin_cpu_supports("avx512f"))},
          {"avx512bw", bool(__builtin_cpu_supports("avx512bw"))},
          {"avx512vl", bool(__builtin_cpu_supports("avx512vl"))},
          {"avx512dq", bool(__builtin_cpu_supports("avx512dq"))},
          {"avx512bf16", bool(__builtin_cpu_supports("avx512bf16"))},
          {"amx-bf16", cpu_has_amx()}};
#else
  return {};
#endif
}

std::string current_isa() { return current().load()->name; }

bool set_isa(const std::string& name) {
  for (const Isa& isa : kIsas) {
    if (name == isa.name && isa.supported()) {
      current().store(&isa);
      return true;
    }
  }
  return false;
}

void attention_forward(const AttentionParams& p) { current().load()->kernel(p); }

}  // namespace fastattn
