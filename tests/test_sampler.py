"""The training sampler's length grouping: alike batches, every sample once, DDP dealing and resume kept."""
import random

from trainer.sampler import ShardSampler


def batches(sampler, batch):
    order = list(sampler)
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def test_length_grouping_keeps_batches_alike_and_visits_every_sample_once():
    rnd = random.Random(0)
    hints = [rnd.choice([40, 180]) + rnd.randrange(10) for _ in range(1000)]
    grouped = ShardSampler(1000, 1, 0, seed=3, batch_size=32, size_hints=hints)
    plain = ShardSampler(1000, 1, 0, seed=3, batch_size=32)

    def padding_efficiency(sampler):
        bs = batches(sampler, 32)
        return sum(hints[i] for b in bs for i in b) / sum(max(hints[i] for i in b) * len(b) for b in bs)

    assert sorted(grouped) == list(range(1000))
    assert padding_efficiency(grouped) > 0.95 > 0.75 > padding_efficiency(plain)
    first = list(grouped)
    grouped.set_epoch(1)
    assert list(grouped) != first and sorted(grouped) == list(range(1000))


def test_two_ranks_see_the_batches_of_one_process_at_double_batch():
    hints = [(i * 37) % 200 for i in range(203)]   # uneven: the last batch is short
    single = batches(ShardSampler(203, 1, 0, seed=5, batch_size=8, size_hints=hints), 8)
    ranks = [batches(ShardSampler(203, 2, r, seed=5, batch_size=4, size_hints=hints), 4) for r in (0, 1)]
    for k, big in enumerate(single[:-1]):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(big)


def test_skip_resumes_the_same_stream_part_way():
    hints = list(range(100))
    sampler = ShardSampler(100, 1, 0, seed=1, batch_size=10, size_hints=hints)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.skip = 30
    assert list(sampler) == whole[30:] and len(sampler) == 70
