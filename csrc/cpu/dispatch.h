// Entry points of the CPU kernels, one per ISA, and the choice between them.
#pragma once

#include "params.h"

namespace fastattn {

namespace generic {
void attention_forward(const AttentionParams& p);
}

// Runs the best kernel this CPU supports.
void attention_forward(const AttentionParams& p);

}  // namespace fastattn
