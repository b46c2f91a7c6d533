"""Block-LoRA around a frozen nn.Linear: LoRA with one shared, repeated down-projection block.
Copy it with comp_lora.py (its base class LoRALinear, add_adapters and the other functions);
the two need torch alone.
"One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning",
arXiv 2501.16720.
Confirmed (abstract): LoRA's matrices are partitioned into sub-matrices, all down-projection ones
shared, some products become additions, with fewer parameters and less compute than LoRA.
Our reconstruction (only the abstract is public to us): A = [A_s ... A_s] by input columns, so
A x = A_s (x_1 + ... + x_n) over the n equal chunks of x: n - 1 additions and one r x (d_in / n)
product instead of the down-projection of n chunks (flag `blocks`)."""
import torch.nn.functional as F
from torch import nn

from comp_lora import LoRALinear, adapter_dropout


class BlockLoRALinear(LoRALinear):
    """h = W x + b + s * B A_s sum_j dropout(x)_j, with W, b frozen and x split into `blocks`
    equal chunks: LoRA with Delta W = s * B [A_s ... A_s], lora_A = A_s: r x (d_in / n).
    The rest (initialisation, scaling, dropout, merging, saving) is LoRALinear's."""

    def __init__(self, base: nn.Linear, r=2, alpha=1.0, dropout=0.25, blocks=8, name=None):
        if blocks < 1 or base.in_features % blocks:
            raise ValueError(f"{name or 'layer'}: input size {base.in_features} "
                             f"is not divisible by blocks={blocks}")
        self.blocks = blocks  # set first: LoRALinear.__init__ sizes the factors with adapter_dims
        super().__init__(base, r, alpha, dropout, name)

    def adapter_dims(self):
        return self.base.in_features // self.blocks, self.base.out_features

    def factors(self):
        return self.lora_A.repeat(1, self.blocks), self.lora_B  # [A_s ... A_s]: r x d_in

    def forward(self, x):
        out = self.base(x)
        if self.merged:
            return out
        # the n chunks x_j of the dropped-out input: (..., d_in) -> (..., n, d_in/n)
        chunks = adapter_dropout(x, self.dropout, self.training).unflatten(-1, (self.blocks, -1))
        # shared A_s: the sum replaces n products; (..., r)
        low = F.linear(chunks.sum(dim=-2), self.lora_A.to(x.dtype))
        # s scales B, not the activations
        return out + F.linear(low, (self.scaling * self.lora_B).to(x.dtype))