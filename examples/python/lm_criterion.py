"""A language-model training step with the loss computed on the replicas (torch_dp.ParallelCriterion).

torch.nn.DataParallel gathers every replica's logits (batch x sequence x vocabulary) on device 0 and computes the
loss there, so device 0 holds the whole logits and their gradient on top of its own replica. Here the logits stay
on the devices that computed them: each replica's device computes the cross-entropy of its own chunk, and only
two numbers per replica (the sum of the loss and the number of tokens counted) travel to the output device. The
result is exactly the whole batch's mean loss, ignored tokens and uneven chunks included.

    python examples/python/lm_criterion.py                       # every GPU, else 4 CPU replicas
    python examples/python/lm_criterion.py --device cpu --replicas 3 --steps 30
"""

import argparse

import torch
import torch.nn as nn

import torch_dp

PAD = -100  # CrossEntropyLoss's default ignore_index


class TinyLM(nn.Module):
    def __init__(self, vocab, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        hidden, _ = self.mix(self.embed(tokens))
        return self.head(hidden)  # (batch, sequence, vocabulary)


def batch_of(vocab, batch, seq, generator):
    """Sequences counting up modulo vocab from a random start (easy to learn), with padded tails."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    tokens = (start + torch.arange(seq + 1)) % vocab
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    lengths = torch.randint(seq // 2, seq + 1, (batch, 1), generator=generator)
    labels[torch.arange(seq) >= lengths] = PAD  # padding: not counted in the mean
    return inputs, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--replicas", type=int, default=None, help="default: every GPU, or 4 CPU replicas")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=50)
    args = parser.parse_args()
    if args.device == "cuda":
        count = torch.cuda.device_count()
        device_ids = [i % count for i in range(args.replicas or count)]
        first = torch.device("cuda", device_ids[0])
    else:
        device_ids, first = ["cpu"] * (args.replicas or 4), torch.device("cpu")

    torch.manual_seed(0)
    model = TinyLM(args.vocab).to(first)
    dp = torch_dp.DataParallel(model, device_ids)
    # The logits and labels of each replica flattened to (tokens, vocabulary) and (tokens,) for the loss.
    criterion = torch_dp.ParallelCriterion(
        nn.CrossEntropyLoss(ignore_index=PAD), prepare=lambda logits, labels: (logits.flatten(0, 1), labels.flatten())
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.steps):
        inputs, labels = batch_of(args.vocab, 13, 24, generator)  # 13 rows: uneven chunks on most device counts
        outputs = dp.forward_scattered(inputs.to(first))  # logits stay on their replicas' devices
        loss = criterion(outputs, labels.to(first))  # == CrossEntropyLoss over the whole batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  chunks {list(outputs.chunk_sizes)}")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not go down: {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
