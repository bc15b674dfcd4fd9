from vcas_bench.launch import main

main()
