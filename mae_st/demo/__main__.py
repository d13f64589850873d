"""`python -m mae_st.demo --out_dir demo_out [--quick]`: see mae_st/demo/run.py."""

from mae_st.demo.run import main

main()
