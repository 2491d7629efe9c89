"""Script entry for `mlx.launch` (it runs a file, not a module): the glm-mlx CLI on every rank."""

from glm_mlx.cli.app import main

if __name__ == "__main__":
    main()
