"""Run by tests/test_faults.py under real torchrun: form the process group as main.py does, in a scenario.

    python -m torch.distributed.run ... tests/fault_probe.py SCENARIO PEER_TIMEOUT

restart: round 0 forms, then rank 1 crashes; in round 1 rank 0 comes late, so rank 1 meets round 0's store keys
         (rank 0's old Gloo address) first -- the situation that ended restarts with "Connection refused".
absent:  rank 0 never forms the group; rank 1 must give up after PEER_TIMEOUT with one line.
Prints one line per rank: 'round R rank r formed in Xs (N keys in the store before)' or 'round R rank r error
after Xs: ...'.
"""
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import process_group  # noqa: E402
from errors import DistributedError  # noqa: E402


def main(scenario, peer_timeout):
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    round_ = int(os.environ['TORCHELASTIC_RESTART_COUNT'])
    agent_store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                                timeout=timedelta(seconds=30))
    keys_before = agent_store.num_keys()
    if scenario == 'restart' and round_ == 1 and rank == 0:
        time.sleep(3)
    if scenario == 'absent' and rank == 0:
        time.sleep(3600)  # torchrun stops this process once rank 1 has failed
    start = time.monotonic()
    try:
        process_group.form_process_group('gloo', rank, world_size, timeout=60, peer_timeout=peer_timeout)
    except DistributedError as e:
        print(f"round {round_} rank {rank} error after {time.monotonic() - start:.1f}s: {e}", flush=True)
        return 1
    print(f"round {round_} rank {rank} formed in {time.monotonic() - start:.1f}s "
          f"({keys_before} keys in the store before)", flush=True)
    if scenario == 'restart' and round_ == 0 and rank == 1:
        os._exit(1)  # a crash after the group formed: torchrun restarts both ranks
    dist.barrier()
    process_group.leave()
    dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
