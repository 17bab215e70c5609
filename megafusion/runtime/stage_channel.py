"""A point-to-point side channel between the first and the last pipeline stage, outside megatron's schedule.

Why: with ``objective.patchify=unet`` the image head (last stage) reads the U-Net down
blocks' skip activations and the timestep embedding ``temb``, which only the first stage can
compute (it alone holds ``image_time_embed`` and ``image_patch_embed``). Megatron's schedule
only moves the hidden states from stage to stage, so these tensors take a channel of their
own, and their gradients take it back.

Protocol, per microbatch ``m`` that has images (one with ``images.count == 0`` sends and
receives nothing on either side; every stage reads the batch, so both know the count)::

    first stage, forward of m  --- isend S_m = flat(skips_m, temb_m) --->  last stage, forward of m:
                                                                           recv, before the head
    first stage, backward of m <--- isend G_m = flat(dL/dS_m) -----------  last stage, backward of m:
      recv, fed into the skips' autograd graph                             once the head's backward ran

``SendToLastStage`` (first stage) is the identity on the patch tokens whose forward sends
the skips and ``temb`` and whose backward receives their gradients and hands them to
autograd, so they flow into the U-Net's down blocks and the timestep embedding.
``RecvFromFirstStage`` (last stage) is the identity on the head's input rows whose forward
receives the skips and ``temb`` (tensors that require grad) and whose backward sends their
gradients. Both sides get the shapes from ``patchify.unet_skip_shapes`` (the U-Net config,
``images.count``, the latent shape), so nothing but data crosses; one flat buffer per
microbatch and direction.

Matching is FIFO per direction: every stage runs the forwards of a step's microbatches in
the same order and their backwards in the same order, in 1F1B and in the interleaved (VPP)
schedule alike, whose first model chunk is on pipeline rank 0 and last on rank pp-1.

Why it cannot deadlock: sends never block (``isend``), so the only waits are the two
receives, and each one's message was issued before the receiver can get there. ``S_m`` is
sent during the first stage's forward of ``m``, before megatron sends that forward's output
on, and the last stage's forward of ``m`` needs (through every stage) that output. ``G_m``
is sent during the last stage's backward of ``m``, before megatron sends that backward's
input gradient back, and the first stage's backward of ``m`` needs (through every stage)
that gradient. The channel has its own process group per (tp, dp, cp) coordinate, the pair
{first-stage rank, last-stage rank} (the membership of megatron's embedding group), so its
messages never sit in the issue order of megatron's own P2P (NCCL matches P2P per
communicator in issue order). NCCL would create the pair's communicator lazily at the first
send / recv, blocking both ends, which inside a schedule hangs (the first stage's first send
would wait for the last stage, which waits for the first stage's activations): ``open_channel``
exchanges one element at setup instead.

Completion of sends: a send's buffer is kept until its work is waited. The first stage waits
``S_m`` after receiving ``G_m`` (sent only after ``S_m`` was received); ``drain()`` waits for
the rest once a schedule has returned (each matching receive is in the peer's same schedule,
which needs nothing more from this rank). ``Trainer._run`` calls it after every schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StageChannel:
    """This rank's end of the channel: ``peer`` is the other end (a global rank) in ``group``."""

    def __init__(self, group, peer: int, is_first_stage: bool, device: torch.device):
        self.group, self.peer, self.is_first_stage, self.device = group, peer, is_first_stage, device
        self._pending: dict[int, tuple] = {}  # ticket -> (work, buffer) of the sends not known complete
        self._tickets = 0

    def send(self, tensors, dtype: torch.dtype) -> int:
        """Start sending ``tensors`` (flattened into one ``dtype`` buffer) to the peer; returns at
        once, with a ticket for ``wait_send``."""
        flat = torch.cat([t.detach().reshape(-1).to(device=self.device, dtype=dtype) for t in tensors])
        work = dist.isend(flat, dst=self.peer, group=self.group)
        # NCCL reports completion without a wait; gloo's send works only complete in wait().
        for done in [k for k, (w, _) in self._pending.items() if w.is_completed()]:
            del self._pending[done]
        self._tickets += 1
        self._pending[self._tickets] = (work, flat)
        return self._tickets

    def recv(self, shapes, dtype: torch.dtype) -> list[torch.Tensor]:
        """Receive the peer's next message as tensors of ``shapes`` (views of one buffer)."""
        sizes = [_numel(s) for s in shapes]
        flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
        dist.recv(flat, src=self.peer, group=self.group)
        return [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes)]

    def wait_send(self, ticket: int) -> None:
        """Wait for one send, when its receive is known to have happened (and free its buffer)."""
        entry = self._pending.pop(ticket, None)
        if entry is not None:
            entry[0].wait()

    def drain(self) -> None:
        """Wait for every send still in flight (call it after a schedule, on every rank)."""
        for ticket in sorted(self._pending):
            self.wait_send(ticket)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class SendToLastStage(torch.autograd.Function):
    """First stage: ``carrier`` unchanged; forward sends ``tensors``, backward receives their gradients."""

    @staticmethod
    def forward(ctx, channel: StageChannel, dtype: torch.dtype, carrier: torch.Tensor, *tensors: torch.Tensor):
        ctx.ticket = channel.send(tensors, dtype)
        ctx.channel, ctx.dtype = channel, dtype
        ctx.meta = [(tuple(t.shape), t.dtype) for t in tensors]
        return carrier

    @staticmethod
    def backward(ctx, grad_carrier):
        grads = ctx.channel.recv([shape for shape, _ in ctx.meta], ctx.dtype)
        # G_m was sent after the last stage had received S_m: that send is done (or about to be).
        ctx.channel.wait_send(ctx.ticket)
        return (None, None, grad_carrier, *(g.to(dt) for g, (_, dt) in zip(grads, ctx.meta)))


class RecvFromFirstStage(torch.autograd.Function):
    """Last stage: ``(carrier, *received)``; forward receives tensors of ``shapes``, backward sends their gradients."""

    @staticmethod
    def forward(ctx, channel: StageChannel, shapes, dtype: torch.dtype, carrier: torch.Tensor):
        received = [t.clone() for t in channel.recv(shapes, dtype)]  # standalone tensors, not views
        ctx.channel, ctx.dtype = channel, dtype
        return (carrier, *received)

    @staticmethod
    def backward(ctx, grad_carrier, *grads):
        ctx.channel.send(grads, ctx.dtype)  # unused outputs get zeros (materialised): always one message
        return None, None, None, grad_carrier


_CHANNEL: StageChannel | None = None
_OPEN = False


def get_channel() -> StageChannel | None:
    """This rank's end of the channel; None with pp == 1, on middle stages, or before ``open_channel``."""
    return _CHANNEL


def is_open() -> bool:
    """Whether ``open_channel`` ran since the last ``close_channel`` (on every rank alike)."""
    return _OPEN


def open_channel(device: torch.device) -> StageChannel | None:
    """Create the channel's groups: collective over the whole world (call it on every rank,
    after megatron's ``initialize_model_parallel``; the model build does when its objective
    needs it). Returns this rank's end, or None."""
    from megatron.core import parallel_state as ps

    global _CHANNEL, _OPEN
    close_channel()
    _OPEN = True
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    first, last = ps.get_pipeline_model_parallel_first_rank(), ps.get_pipeline_model_parallel_last_rank()
    pairs = [None] * dist.get_world_size()
    dist.all_gather_object(pairs, (first, last))
    rank, mine = dist.get_rank(), None
    for pair in sorted(set(pairs)):  # the same order on every rank: new_group is collective
        group = dist.new_group(list(pair))
        if rank in pair:
            mine = group
    if rank == first:
        _CHANNEL = StageChannel(mine, last, True, device)
    elif rank == last:
        _CHANNEL = StageChannel(mine, first, False, device)
    if _CHANNEL is not None:
        # Create the pair's communicator now (NCCL does it at the first send / recv, blocking
        # both ends), and check that the two ends agree on who is who.
        probe = torch.tensor([first], dtype=torch.float32, device=device)
        if _CHANNEL.is_first_stage:
            dist.send(probe, dst=last, group=mine)
        else:
            got = torch.full_like(probe, -1.0)
            dist.recv(got, src=first, group=mine)
            if int(got.item()) != first:
                raise RuntimeError(
                    f"stage channel: rank {rank} expected rank {first} at the other end, "
                    f"got a message from rank {int(got.item())}"
                )
    return _CHANNEL


def close_channel() -> None:
    """Forget this rank's end, as ``destroy_model_parallel`` forgets megatron's groups. Sends
    still in flight are not waited for: after an error on the peer they would never finish."""
    global _CHANNEL, _OPEN
    _CHANNEL, _OPEN = None, False


def drain() -> None:
    """Wait for this rank's sends still in flight: after each pipeline schedule, on every rank."""
    if _CHANNEL is not None:
        _CHANNEL.drain()
