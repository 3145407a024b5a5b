import pytest

from core.buckets import BucketSpec
from serve.kv import BlockPool, KVSpec


def test_uniform_buckets_follow_the_paper():
    spec = BucketSpec.uniform(2048, 10)
    assert spec.num_buckets == 10 and spec.max_tokens == 2048
    assert spec.upper_edge(0) == 205  # width max_len / 10, rounded up
    assert spec.bucket_of(1) == 0 and spec.bucket_of(205) == 0 and spec.bucket_of(206) == 1
    assert spec.bucket_of(0) == 0 and spec.bucket_of(10_000) == 9
    assert spec.lower_edge(1) == 205 and spec.midpoint(0) == 102.5
    assert spec.clip(10_000) == 2048 and spec.clip(-3) == 0 and spec.clip(300) == 300


def test_quantile_bucket_and_round_trip():
    spec = BucketSpec.uniform(40, 4)
    assert spec.quantile_bucket([0.5, 0.3, 0.2, 0.0], 0.5) == 0
    assert spec.quantile_bucket([0.5, 0.3, 0.2, 0.0], 0.9) == 2
    assert BucketSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        spec.quantile_bucket([1.0], 0.5)


def test_quantile_length_interpolates_inside_the_bucket_as_the_estimator_does():
    from serve.estimate import LengthDistribution

    spec = BucketSpec.uniform(40, 4)  # buckets of 10 tokens
    assert spec.quantile_length([0.5, 0.3, 0.2, 0.0], 0.5) == 10  # all of bucket 0
    assert spec.quantile_length([0.5, 0.3, 0.2, 0.0], 0.65) == 15  # half of bucket 1
    assert spec.quantile_length([0.0, 0.0, 0.0, 1.0], 0.01) == 31
    for probs in ([0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0, 0.0]):
        for q in (0.1, 0.25, 0.5, 0.7, 0.9, 0.99):
            assert spec.quantile_length(probs, q) == LengthDistribution(spec, probs).remaining(0, q, 40).quantile_tokens


def test_quantile_edges_split_counts():
    spec = BucketSpec.from_quantiles(list(range(1, 101)), max_tokens=200, num_buckets=4)
    assert spec.max_tokens == 200 and spec.num_buckets == 4
    assert [spec.bucket_of(n) for n in (10, 40, 60, 90)] == [0, 1, 2, 3]


@pytest.mark.parametrize("edges", [(), (0, 5), (5, 5), (6, 3)])
def test_bad_edges_are_refused(edges):
    with pytest.raises(ValueError):
        BucketSpec(edges)


def test_kv_spec_bytes_per_token():
    # SmolLM2-135M in fp32: 30 layers x (K, V) x 3 kv heads x 64 dims x 4 bytes.
    spec = KVSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    assert spec.bytes_per_token == 46_080
    assert KVSpec(30, 3, 64, 4, tensor_parallel=3).bytes_per_token == 15_360
    assert spec.num_blocks(46_080 * 16 * 10 + 5, block_size=16) == 10


def test_pool_allocation_is_all_or_nothing_and_freeing_is_exact():
    pool = BlockPool(num_blocks=4, block_size=4)
    assert pool.allocate("a", 9) is not None and pool.num_blocks_held("a") == 3
    assert pool.allocate("a", 12) == []  # already covered
    assert pool.allocate("b", 8) is None  # needs 2, 1 free: nothing taken
    assert pool.num_free_blocks == 1 and pool.num_blocks_held("b") == 0
    assert len(pool.allocate("b", 4)) == 1
    pool.check()
    assert pool.free("a") == 3 and pool.free("b") == 1 and pool.free("missing") == 0
    assert pool.num_free_blocks == 4
    pool.check()
