import sys, loadtest.driver as d
n = int(sys.argv[1]); d._Connections.__init__.__defaults__ = (n,)
from recserve.cli.main import main
sys.argv = ["recserve"] + sys.argv[2:]
sys.exit(main(sys.argv[1:]))
