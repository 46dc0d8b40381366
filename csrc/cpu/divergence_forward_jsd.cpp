// The CPU forward's row loop of the generalized JSD, in a unit of its own (divergence_forward_rows.h).
#include "divergence_forward_rows.h"

template void minillm_cpu::divergence_forward_rows<Divergence::kJsd>(const minillm_cpu::ForwardRows&);
