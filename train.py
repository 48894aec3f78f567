"""Train a VAE of the collection: ``python train.py fit --config configs/default.yaml``.

A thin LightningCLI entry point (see ``lightning_geco/cli.py``); every standard override
works (``--trainer.max_steps``, ``--trainer.devices``, ``--data.batch_size``, ...).
"""

from lightning_geco.cli import main

if __name__ == "__main__":
    main()
