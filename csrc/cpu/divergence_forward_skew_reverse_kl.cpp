// The CPU forward's row loop of the skew reverse KL, in a unit of its own (divergence_forward_rows.h).
#include "divergence_forward_rows.h"

template void minillm_cpu::divergence_forward_rows<Divergence::kSkewReverseKl>(const minillm_cpu::ForwardRows&);
