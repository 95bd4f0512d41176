"""The AHIQ model: backbones (`backbones`), deformable convolution (`deform`), heads and the network
(`ahiq`), head checkpoints (`checkpoint`), the reference-grouped heads of the engine (`grouped`) and
the weights downloader (`weights`). Its config, `ModelConfig`, lives in `members.contract.member`."""
