from vcas_bench.cli import main

main()
