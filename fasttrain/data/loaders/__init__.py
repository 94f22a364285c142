"""The loaders, each following the contract of `fasttrain.data.sharding`: the same samples on each rank,
whichever loader delivers them.

    plain.py        the tutorial's Dataset + torchvision transforms + DataLoader (data.loader=plain), for arrays and
                    for image files
    gpu.py          the whole split resident on the device, augmented in whole batches (data.loader=gpu)
    dali.py         an NVIDIA DALI pipeline over arrays (data.loader=dali)
    dali_folder.py  a DALI pipeline decoding image files (data.loader=dali with data.dataset=folder)

`fasttrain.data.build` chooses and builds them; nothing is re-exported here.
"""
