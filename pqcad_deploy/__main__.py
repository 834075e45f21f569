"""`python -m pqcad_deploy ARGS`: the same as the `pqcad-deploy` console script."""

from pqcad_deploy.cli import main

if __name__ == "__main__":
    main()
