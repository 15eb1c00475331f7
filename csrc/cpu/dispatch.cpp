// Baseline-compiled: chooses the kernel for this CPU.
#include "cpu/dispatch.h"

namespace fastattn {

void attention_forward(const AttentionParams& p) { generic::attention_forward(p); }

}  // namespace fastattn
