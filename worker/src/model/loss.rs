//! The training loss without the whole batch's logits.
//!
//! The fp32 logits of a batch are micro-batch × tokens × vocabulary: at a 128 K vocabulary and
//! 16 K tokens, 8 GB, and as much again for their gradient — the largest tensor of a training
//! step by far. Here the final norm, the head and the cross-entropy run over chunks of positions
//! with their own small backward each: a chunk's logits live only while its gradient flows back
//! into the head's weights and into the gradient of the hidden states, which the rest of the
//! backward pass then takes as its seed. Loss and gradients are those of the whole batch at
//! once up to floating-point reassociation (the head's weight gradient is summed chunk by
//! chunk).

use super::llama::{Llama, Packing};
use tch::{Kind, Reduction, Tensor};

/// Logit elements per chunk (fp32: 128 MiB, plus as much for its gradient). Large enough that
/// a chunk's matrix product stays efficient (512 positions at a 64 K vocabulary), small beside
/// the weights of any model with such a vocabulary.
pub const CHUNK_ELEMENTS: i64 = ferrotune_data::LOSS_CHUNK_ELEMENTS;

impl Llama {
    /// Backward of `scale` × the summed cross-entropy of the head applied to `hidden` (batch,
    /// seq, hidden; the last decoder layer's output, not part of any graph), chunk by chunk
    /// along the sequence. Accumulates the final norm's and the head's gradients; returns the
    /// (unscaled) loss sum and the gradient with respect to `hidden`.
    pub(super) fn head_loss_backward(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        scale: f64,
        chunk_elements: i64,
    ) -> (f64, Tensor) {
        let (batch, seq, _) = hidden
            .size3()
            .expect("hidden states are (batch, seq, hidden)");
        let step = (chunk_elements / (batch * self.vocab_size()).max(1)).max(1);
        let mut total = Tensor::zeros([], (Kind::Double, hidden.device()));
        let mut grads = Vec::with_capacity((seq / step + 1) as usize);
        let mut start = 0;
        while start < seq {
            let len = step.min(seq - start);
            let h = hidden
                .narrow(1, start, len)
                .detach()
                .set_requires_grad(true);
            let logits = self.head(&h);
            let loss = self.cross_entropy(&logits, &labels.narrow(1, start, len), Reduction::Sum);
            // Summed on the device: one host sync per call, not per chunk.
            total += loss.detach().to_kind(Kind::Double);
            (loss * scale).backward();
            grads.push(h.grad());
            start += len;
        }
        (total.double_value(&[]), Tensor::cat(&grads, 1))
    }

    /// Accumulates the gradient of `scale × loss sum` into the parameters and returns the
    /// (unscaled) loss sum: [`Llama::loss_sum_packed`] + backward, without the batch's logits
    /// (see the module documentation). `chunk_elements` bounds one chunk's logits
    /// ([`CHUNK_ELEMENTS`] in training).
    pub fn loss_sum_backward(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
        chunk_elements: i64,
    ) -> f64 {
        let hidden = self.hidden_packed(input_ids, packing);
        let (loss, upstream) =
            self.head_loss_backward(&hidden.detach(), labels, scale, chunk_elements);
        // The rest of the graph, seeded with the gradient the head passed back.
        (hidden * upstream).sum(Kind::Float).backward();
        loss
    }
}
