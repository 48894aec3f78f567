"""ResumableSampler: the training order as a function of (seed, epoch), resumed at any batch."""

import re

import pytest
import torch
from lightning_geco.datamodules import ResumableSampler


def _batches(sampler, batch_size):
    indices = list(sampler)
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def test_each_epoch_is_a_seeded_permutation_without_the_last_incomplete_batch():
    done = [0]
    sampler = ResumableSampler(range(50), batch_size=8, batches_done=lambda: done[0], seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 48 and len(set(first)) == 48
    assert first == sampler.order(0)[:48].tolist() == ResumableSampler(range(50), 8, seed=3).order(0)[:48].tolist()
    done[0] = 6  # the next epoch (6 batches an epoch)
    second = list(sampler)
    assert second == sampler.order(1)[:48].tolist() != first


def test_iteration_starts_at_the_batch_training_has_reached_and_holds_one_pass():
    # A pass's worth of batches from there, into the next pass where it started inside one: an
    # epoch cut by limit_train_batches is that many batches wherever it starts.
    done = [0]
    sampler = ResumableSampler(range(50), batch_size=8, batches_done=lambda: done[0], seed=3)
    whole = []
    for start in (0, 6, 12):  # three passes of 6 batches
        done[0] = start
        whole += _batches(sampler, 8)
    assert whole[6:12] == _batches(ResumableSampler(range(50), 8, seed=4), 8)  # pass 1: seed 3 + 1
    for reached in (0, 2, 5, 6, 9):
        done[0] = reached
        assert _batches(sampler, 8) == whole[reached : reached + 6]


def test_ranks_take_disjoint_runs_of_each_global_batch_that_together_are_the_one_process_batch():
    one = _batches(ResumableSampler(range(100), batch_size=16, seed=1), 16)
    ranks = [_batches(ResumableSampler(range(100), batch_size=4, seed=1, num_replicas=4, rank=r), 4) for r in range(4)]
    assert all(len(batches) == len(one) == 6 for batches in ranks)
    for j, batch in enumerate(one):
        assert sum((ranks[r][j] for r in range(4)), []) == batch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "ResumableSampler batch_size must be a positive int, got 0."),
        ({"batch_size": 8, "num_replicas": 2, "rank": 2}, "ResumableSampler rank must lie in [0, 2), got 2."),
        ({"batch_size": 8, "num_replicas": 4}, "ResumableSampler: 20 examples make no full batch of 8 x 4 ranks."),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ResumableSampler(range(20), **kwargs)


def test_the_order_does_not_touch_the_global_generator():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(ResumableSampler(range(30), batch_size=5, seed=2))
    assert torch.equal(torch.get_rng_state(), state)


def test_starting_a_training_loader_does_not_move_the_global_generator():
    # A resumed run starts its loader mid-epoch, where the uninterrupted run starts none: a draw
    # from the global generator there would shift every later latent-noise draw.
    from lightning_geco.datamodules import ShapesDataModule

    data = ShapesDataModule(image_size=16, num_train=64, num_val=8, batch_size=8)
    data.setup("fit")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    next(iter(data.train_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)


def test_the_training_loader_states_its_order_and_refuses_another():
    from lightning_geco.datamodules import ResumableLoader, ShapesDataModule

    data = ShapesDataModule(image_size=16, num_train=64, num_val=16, batch_size=16)
    data.setup()
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableLoader) and loader.state_dict() == {"shuffle_seed": data.shuffle_seed}
    loader.load_state_dict({"shuffle_seed": data.shuffle_seed})
    with pytest.raises(ValueError, match=rf"drawn with seed {data.shuffle_seed + 1}; this loader's with seed {data.shuffle_seed}"):
        loader.load_state_dict({"shuffle_seed": data.shuffle_seed + 1})


def test_an_empty_training_loader_is_an_error_not_a_finished_run(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_geco import ConvVAE, RunSummary

    model = ConvVAE(image_shape=(1, 16, 16), latent_dim=2, widths=(4,), hidden_dim=8)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[RunSummary()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"The training loader yields no batch \(0 batches per epoch\)"):
        trainer.fit(model, DataLoader(TensorDataset(torch.rand(0, 1, 16, 16)), batch_size=4))


def test_batches_after_counts_the_last_shorter_accumulation_window_of_an_epoch():
    sampler = ResumableSampler(range(64), batch_size=16, seed=0)  # 4 batches an epoch
    assert [sampler.batches_after(steps, 3) for steps in range(5)] == [0, 3, 4, 7, 8]  # windows of 3 and 1
    assert [sampler.batches_after(steps, 2) for steps in range(4)] == [0, 2, 4, 6]
    assert [sampler.batches_after(steps) for steps in range(3)] == [0, 1, 2]


def test_batches_after_follows_the_epochs_limit_train_batches_cuts():
    # A pass of 12 batches in epochs of 5, 5 and 2 (limit_train_batches 5), windows of 2: 3, 3
    # and 1 steps. Counting steps x 2 put epoch 1's start at batch 6: batch 5 was never trained on.
    sampler = ResumableSampler(range(192), batch_size=16, seed=0)
    assert [sampler.batches_after(steps, 2, epoch_limit=5) for steps in range(9)] == [0, 2, 4, 5, 7, 9, 10, 12, 14]
    assert [sampler.batches_after(steps, 3, epoch_limit=5) for steps in range(5)] == [0, 3, 5, 8, 10]
    assert [sampler.batches_after(steps, 3, epoch_limit=12) for steps in range(5)] == [0, 3, 6, 9, 12]
    assert sampler.batches_after(7, 2, epoch_limit=50) == sampler.batches_after(7, 2) == 14  # a limit past the pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accumulate, max_steps", [(2, 9), (3, 10)])
def test_a_fit_cut_by_limit_train_batches_with_accumulation_trains_on_every_image_of_each_pass(accumulate, max_steps):
    # Epochs of 5 batches over passes of 12. Counted as steps x window, an epoch's short last
    # window skipped the batches it left (accumulate 2: 1 in 6 of the data); stopped at the pass's
    # end, an epoch of its 2 leftover batches never stepped under accumulate 3, and the next
    # epoch started on them again: the fit never ended.
    import pytorch_lightning as pl
    from lightning_geco.datamodules import ShapesDataModule

    from helpers import quiet_trainer, tiny_conv_vae
    from lightning_geco import ELBO

    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=192, num_val=16, batch_size=16)  # 12 batches a pass
    seen = []

    class Images(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([image.numpy().tobytes() for image in batch[0]])

    trainer = quiet_trainer(max_steps=max_steps, limit_train_batches=5, limit_val_batches=0,
                            accumulate_grad_batches=accumulate, callbacks=[Images()])
    trainer.fit(tiny_conv_vae(objective=ELBO()), data)
    epochs = max_steps // -(-5 // accumulate)
    assert trainer.global_step == max_steps and trainer.current_epoch == epochs and len(seen) == 5 * epochs
    training = sorted(image.numpy().tobytes() for image, *_ in data.train_dataloader().dataset)
    for first in range(0, len(seen) - 11, 12):  # each whole pass: every image once, none left out
        assert sorted(image for batch in seen[first : first + 12] for image in batch) == training


@pytest.mark.timeout(180)
def test_a_fit_cut_by_limit_train_batches_resumed_with_loader_workers_draws_the_uninterrupted_batches(tmp_path):
    # A loader with workers draws its first indices before Lightning has set num_training_batches
    # (inf until then): the resumed epoch started where an unlimited one would, skipping one
    # batch and training on another twice.
    import pytorch_lightning as pl
    from lightning_geco.datamodules import ShapesDataModule
    from pytorch_lightning.callbacks import ModelCheckpoint

    from helpers import quiet_trainer, tiny_conv_vae
    from lightning_geco import ELBO

    def fit(max_steps, ckpt_path=None, checkpoints=None):
        pl.seed_everything(0)
        data = ShapesDataModule(image_size=16, num_train=192, num_val=16, batch_size=16, num_workers=2)  # 12 a pass
        seen = []

        class Batches(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(batch[0].numpy().tobytes())

        callbacks = [Batches()]
        if checkpoints is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=4, save_top_k=-1))
        trainer = quiet_trainer(max_steps=max_steps, limit_train_batches=5, limit_val_batches=0, accumulate_grad_batches=2,
                                callbacks=callbacks, enable_checkpointing=checkpoints is not None)
        trainer.fit(tiny_conv_vae(objective=ELBO()), data, ckpt_path=ckpt_path)
        return seen

    whole = fit(8)
    first = fit(4, checkpoints=tmp_path)
    resumed = fit(8, ckpt_path=next(tmp_path.glob("*step=4*.ckpt")))
    assert len(whole) == 14 and first[:7] + resumed == whole  # epochs of 5 batches in 3 steps: step 4 at batch 7


def test_a_datamodule_with_accumulation_that_does_not_divide_its_epoch_keeps_stepping():
    # 4 batches an epoch at accumulate_grad_batches 3: Lightning steps twice an epoch. Counting
    # consumed batches as steps x 3 started epoch 1 at its batch 2 and every later epoch there
    # too: no window ever filled again, and a max_steps run never ended.
    import pytorch_lightning as pl
    from lightning_geco.datamodules import ShapesDataModule

    from helpers import quiet_trainer, tiny_conv_vae
    from lightning_geco import ELBO

    pl.seed_everything(0)
    data = ShapesDataModule(image_size=16, num_train=80, num_val=16, batch_size=16)
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, accumulate_grad_batches=3)
    trainer.fit(tiny_conv_vae(objective=ELBO()), data)
    assert trainer.global_step == 6


def test_a_run_stepping_two_optimizers_a_batch_walks_and_resumes_the_order_by_batches(tmp_path):
    # Manual optimization counts both optimizers' steps in global_step (2 a batch); the order
    # used to be placed by it, skipping every other epoch and half an epoch on resume.
    import pytorch_lightning as pl
    from lightning_geco.datamodules import ShapesDataModule
    from pytorch_lightning.callbacks import ModelCheckpoint

    from helpers import TwoOptimizerVAE, quiet_trainer, tiny_conv_vae
    from lightning_geco import GECOCallback

    def fit(max_steps, ckpt_path=None, checkpoints=()):
        pl.seed_everything(0)
        data = ShapesDataModule(image_size=16, num_train=64, num_val=16, batch_size=16)  # 4 batches an epoch
        seen = []

        class Seen(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(batch[1].sum().item())

        trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[GECOCallback(), Seen(), *checkpoints],
                                enable_checkpointing=bool(checkpoints))
        trainer.fit(tiny_conv_vae(model_class=TwoOptimizerVAE), data, ckpt_path=ckpt_path)
        return seen, data

    whole, data = fit(20)  # 10 batches: epoch 0, epoch 1, half of epoch 2
    orders = [data.train_dataset.tensors[1][data.train_dataloader().sampler.order(e)] for e in range(3)]
    expected = [orders[e][16 * b : 16 * b + 16].sum().item() for e, b in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1))]
    assert whole[:6] == pytest.approx(expected)
    first, _ = fit(10, checkpoints=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)])
    resumed, _ = fit(20, ckpt_path=str(next(tmp_path.glob("*step=6.ckpt"))))  # after 3 batches, mid-epoch
    assert first[:3] + resumed == whole


def test_overfit_batches_trains_and_checkpoints_on_lightnings_sequential_sampler(tmp_path):
    # Lightning rebuilds the training loader with a SequentialSampler for overfit_batches; saving
    # the checkpoint asked that sampler for its seed, and the trained run was lost.
    import pytorch_lightning as pl
    from lightning_geco.datamodules import ShapesDataModule

    from helpers import tiny_conv_vae
    from lightning_geco import GECOCallback

    data = ShapesDataModule(image_size=16, num_train=64, num_val=16, batch_size=16)
    trainer = pl.Trainer(max_steps=4, overfit_batches=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GECOCallback()], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="We are turning off the train dataloader shuffling"):
        trainer.fit(tiny_conv_vae(), data)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert trainer.global_step == 4 and torch.load(checkpoint, weights_only=False)["global_step"] == 4


def test_validations_with_workers_draw_from_the_global_generator_as_without():
    # A persistent validation loader drew its workers' seed from the global generator once per
    # process: a resumed run's validations, and num_workers 0's, drew other latent noise.
    from lightning_geco.datamodules import ShapesDataModule

    def generator_after_two_validations(num_workers):
        data = ShapesDataModule(image_size=8, num_train=64, num_val=16, batch_size=8, num_workers=num_workers)
        data.setup("fit")
        loader = data.val_dataloader()
        torch.manual_seed(0)
        for _ in range(2):
            for _ in loader:
                pass
        return torch.get_rng_state()

    assert torch.equal(generator_after_two_validations(0), generator_after_two_validations(2))
    data = ShapesDataModule(image_size=8, num_train=64, num_val=16, batch_size=8, num_workers=2)
    data.setup("fit")
    assert data.train_dataloader().persistent_workers and not data.val_dataloader().persistent_workers
