// Entry points of the CPU kernels, one per ISA, and the run-time choice between them.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "params.h"

namespace fastattn {

namespace generic {
void attention_forward(const AttentionParams& p);
}
namespace avx2 {
void attention_forward(const AttentionParams& p);
}
namespace avx512 {
void attention_forward(const AttentionParams& p);
}
namespace avx512bf16 {
void attention_forward(const AttentionParams& p);
}
namespace amx {
void attention_forward(const AttentionParams& p);
}

// Kernel variants, best last. "scalar" is the portable build (baseline SIMD only); "avx512bf16" and
// "amx" differ from "avx512" only for bfloat16.
std::vector<std::string> supported_isas();  // those this CPU and this build can run
std::string current_isa();
// (name, present) for the x86 features the kernels care about; empty elsewhere.
std::vector<std::pair<std::string, bool>> cpu_features();
// Selects a supported ISA by name; returns false if the name is unknown or unsupported here.
bool set_isa(const std::string& name);

// Runs the kernel of the current ISA.
void attention_forward(const AttentionParams& p);

}  // namespace fastattn
