"""``python -m kdgraph`` (and ``torchrun --nproc_per_node N -m kdgraph train SPEC``)."""

from kdgraph.cli.main import main

if __name__ == "__main__":
    main()
