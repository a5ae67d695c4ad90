"""What turns a batch into a loss: the only part that differs between SFT, MPO and pre-training.

An objective has two calls. ``weight_totals(batch)`` returns the batch's contribution to the
step's normalisers (e.g. the sum of token weights); the loop sums them over all micro-batches of
the step and all ranks before any backward. ``__call__(model, batch, totals)`` returns the
micro-batch's share of the step loss and metric shares that add up, over micro-batches and ranks,
to the step's values. This is what makes the gradient independent of the split.
"""
