// The sm_90a dK/dV kernel's body around its consumer loop, shared by flash_bwd_sm90.cu and
// flash_bwd_sm90_split_d.cu: the grid's last num_converters CTAs convert dQ tiles
// (bwd_sm90_converter.cuh); in the others the producer warpgroup copies and reduces
// (bwd_sm90_producer.cuh) and the consumer warpgroups run kConsume.
#pragma once
#include "bwd_sm90_converter.cuh"
#include "bwd_sm90_producer.cuh"

template <void (*kConsume)(const DkDvCta&)>
__device__ __forceinline__ void dkdv_kernel(const BwdParams& params, const TmaMaps& maps) {
    const int num_dkdv_ctas = gridDim.x - params.num_converters;
    if (blockIdx.x >= num_dkdv_ctas) {
        convert_dq_of_done_heads(params, blockIdx.x - num_dkdv_ctas);
        return;
    }
    const DkDvCta cta(params);
    if (threadIdx.x < 128) {  // producer warpgroup
        ptx::setmaxnreg_dec<kProducerRegs>();
        produce(cta, maps);
        return;
    }
    kConsume(cta);
}
