"""`python -m routing --start 2026-06-01 --out DIR`: regenerate the example network's CSV files."""

from routing.example import main

main()
