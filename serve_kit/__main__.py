"""`python -m serve_kit ...`: the same CLI as the `serve-kit` console script."""
from .cli import main

if __name__ == "__main__":
    main()
