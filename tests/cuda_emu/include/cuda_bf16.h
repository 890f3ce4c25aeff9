// Stand-in for the CUDA header of the same name: the host emulation of tests/cuda_emu.
#pragma once
#include "../cuda_emu.h"
