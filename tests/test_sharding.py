"""How an epoch is shared out among ranks: every sample once, equal steps, exact evaluation."""

import pytest

from fasttrain.data.sharding import ShardedBatches
from fasttrain.dist import read_env
from fasttrain.errors import UserError
from fasttrain.dist.hostlist import first_host


def epoch_batches(n, batch, world, epoch=0, **kw):
    ranks = []
    for rank in range(world):
        sampler = ShardedBatches(n, batch, shuffle=kw.get("shuffle", True),
                                 seed=7, rank=rank, world_size=world, drop_last=kw.get("drop_last", False),
                                 exact=kw.get("exact", False))
        sampler.set_epoch(epoch)
        batches = [[i for _, i in b] for b in sampler]
        assert len(batches) == len(sampler)
        ranks.append(batches)
    return ranks


@pytest.mark.parametrize("n,batch,world", [(100, 16, 1), (100, 16, 2), (100, 16, 3), (50_000, 128, 8), (13, 3, 3)])
def test_every_sample_once_per_epoch_with_equal_steps_per_rank(n, batch, world):
    ranks = epoch_batches(n, batch, world)
    assert len({len(r) for r in ranks}) == 1  # no rank waits on a collective the others never reach
    seen = sorted(i for r in ranks for b in r for i in b)
    assert seen == list(range(n))


def test_step_k_of_all_ranks_is_the_global_batch_of_one_process():
    one = epoch_batches(96, 32, 1)[0]
    two = epoch_batches(96, 16, 2)
    for k, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][k] + two[1][k])


def test_a_fresh_permutation_each_epoch_from_the_seed():
    first, again, second = epoch_batches(64, 8, 2, 0), epoch_batches(64, 8, 2, 0), epoch_batches(64, 8, 2, 1)
    assert first == again and first != second


def test_drop_last_keeps_only_full_global_batches():
    ranks = epoch_batches(100, 16, 3, drop_last=True)
    assert [len(r) for r in ranks] == [2, 2, 2] and all(len(b) == 16 for r in ranks for b in r)


def test_fewer_leftover_samples_than_ranks_are_left_out_rather_than_hang():
    ranks = epoch_batches(98, 16, 3)  # 98 = 2 x 48 + 2 leftover < 3 ranks
    assert [len(r) for r in ranks] == [2, 2, 2]
    assert len({i for r in ranks for b in r for i in b}) == 96


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_counts_every_image_exactly_once(world):
    ranks = epoch_batches(101, 8, world, shuffle=False, exact=True)
    assert sorted(i for r in ranks for b in r for i in b) == list(range(101))


def test_torchrun_variables():
    env = read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (3, 1, 8, "n1", 1234)


def test_slurm_variables_map_when_torchrun_is_absent():
    env = read_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
                    "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (5, 1, 8, "gpu07", 29500)


def test_no_launcher_is_world_size_one():
    env = read_env({})
    assert (env.rank, env.world_size, env.master_addr) == (0, 1, None)


def test_bad_launcher_environment_is_a_clear_error():
    with pytest.raises(UserError, match="rank 4 is outside world size 2"):
        read_env({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})
    with pytest.raises(UserError, match="RANK='zero' is not an integer"):
        read_env({"RANK": "zero", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist,first", [("gpu[07-09,12],cpu1", "gpu07"), ("node5", "node5"),
                                            ("a100-[3,5]", "a100-3"), ("n1,n2", "n1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("n,batch,world,drop_last", [(100, 16, 1, False), (100, 16, 2, False), (100, 8, 3, True),
                                                     (13, 3, 3, False)])
def test_an_epoch_resumed_after_k_steps_yields_exactly_the_batches_not_yet_trained(n, batch, world, drop_last):
    for k in range(len(epoch_batches(n, batch, world, epoch=2, drop_last=drop_last)[0]) + 1):
        for rank, full in enumerate(epoch_batches(n, batch, world, epoch=2, drop_last=drop_last)):
            sampler = ShardedBatches(n, batch, shuffle=True, seed=7, rank=rank, world_size=world, drop_last=drop_last)
            sampler.set_epoch(2, start_sample=k * batch * world)
            assert [[i for _, i in b] for b in sampler] == full[k:]
            assert sampler.batches_left() == len(full) - k and len(sampler) == len(full)
        sampler.set_epoch(3)  # the next epoch is whole again
        assert sampler.batches_left() == len(sampler)


@pytest.mark.parametrize("n,batch,old_world,new_world,drop_last", [(97, 32, 1, 2, False), (100, 10, 1, 3, False),
                                                                    (97, 16, 2, 3, False), (130, 8, 3, 2, True),
                                                                    (13, 3, 3, 2, False)])
def test_an_epoch_resumed_with_another_world_size_gives_every_rank_the_same_number_of_steps(
        n, batch, old_world, new_world, drop_last):
    """A checkpoint of `old_world` ranks continued by `new_world`: the resumed position need not be a multiple
    of the new global batch, and a leftover smaller than the number of ranks would give some ranks one more
    batch than the others (they would wait forever in its collective)."""
    old_steps = len(epoch_batches(n, batch, old_world, drop_last=drop_last)[0])
    for k in range(old_steps + 1):
        start = k * batch * old_world
        ranks = []
        for rank in range(new_world):
            sampler = ShardedBatches(n, batch, shuffle=True, seed=7, rank=rank, world_size=new_world,
                                     drop_last=drop_last)
            sampler.set_epoch(0, start_sample=start)
            ranks.append([[i for _, i in b] for b in sampler])
            assert sampler.batches_left() == len(ranks[-1])
        assert len({len(r) for r in ranks}) == 1, (k, [len(r) for r in ranks])
        order = sampler.order().tolist()
        trained = [i for r in ranks for b in r for i in b]
        assert len(trained) == len(set(trained)) and set(trained) <= set(order[start:])
        assert len(order[start:]) - len(trained) < (batch * new_world if drop_last else new_world)
