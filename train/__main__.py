"""``python -m train --config configs/tiny.yaml [--section.key=value ...]``, also under
``torchrun --nproc-per-node N -m train ...``."""

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .config import ConfigError, load_config


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .trainer import Trainer  # after validation: nothing heavy runs for a bad config

    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


@record  # torchrun's elastic error report: the failing rank's traceback in the launcher's output
def main() -> int:
    return run()


if __name__ == "__main__":
    sys.exit(main())
