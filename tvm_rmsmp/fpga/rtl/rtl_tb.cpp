// Verilator driver for rtl_tb.v (used by tvm_rmsmp/fpga/rtl_sim.py). Reads commands from
// stdin, one per line, each one clock cycle of one unit; values are decimal integers:
//   sp2  <clear> <act_signed> <act x SP2_PIX*SP2_RED> <code x SP2_RED>
//   l4   <clear> <act_signed> <act x SP2_PIX*SP2_RED> <code x SP2_RED>   (Fixed-4 LUT multipliers)
//   dp   <clear> <act_signed> <w8> <act x 2*DP_PIX*DP_RED> <code x DP_RED>
//   d1   <clear> <act_signed> <w8> <act x D1_PIX*D1_RED> <code x D1_RED>
//   alu  <op> <acc x LANES> <operand x LANES> <shift x LANES> [<acc_b x LANES>]   -> prints the LANES results
//   bias <value>                                                  (the arrays' bias port: a clear starts from it)
//   rd   sp2|l4|dp|d1                                             -> prints the accumulators
//   dims                                                        -> prints the array sizes
#include "Vrtl_tb.h"
#include "verilated.h"
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

static const int SP2_PIX = 3, SP2_RED = 5, DP_PIX = 2, DP_RED = 20, D1_PIX = 3, D1_RED = 5, LANES = 4;

template <std::size_t N> static void put(VlWide<N>& w, int lsb, int width, uint64_t v) {
    for (int b = 0; b < width; ++b) {
        uint32_t bit = (v >> b) & 1u, i = (lsb + b) / 32, o = (lsb + b) % 32;
        w[i] = (w[i] & ~(1u << o)) | (bit << o);
    }
}
template <typename T> static void put(T& w, int lsb, int width, uint64_t v) {
    for (int b = 0; b < width; ++b) {
        T bit = (T)((v >> b) & 1u);
        w = (T)((w & ~((T)1 << (lsb + b))) | (bit << (lsb + b)));
    }
}
template <std::size_t N> static int64_t get(const VlWide<N>& w, int lsb, int width) {
    uint64_t v = 0;
    for (int b = 0; b < width; ++b) v |= (uint64_t)((w[(lsb + b) / 32] >> ((lsb + b) % 32)) & 1u) << b;
    if (width < 64 && (v >> (width - 1)) & 1) v |= ~0ull << width;
    return (int64_t)v;
}
template <typename T> static int64_t get(const T& w, int lsb, int width) {
    uint64_t v = ((uint64_t)w >> lsb) & (width >= 64 ? ~0ull : ((1ull << width) - 1));
    if (width < 64 && (v >> (width - 1)) & 1) v |= ~0ull << width;
    return (int64_t)v;
}

int main(int argc, char** argv) {
    VerilatedContext ctx;
    ctx.commandArgs(argc, argv);
    Vrtl_tb top(&ctx);
    top.clk = 0;
    top.bias = 0;
    top.eval();
    auto tick = [&]() { top.eval(); top.clk = 1; top.eval(); top.clk = 0; top.eval();
                        top.sp2_en = top.l4_en = top.dp_en = top.d1_en = top.alu_en = 0; };
    std::string line;
    int64_t v;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string cmd;
        if (!(in >> cmd)) continue;
        if (cmd == "bias") {
            in >> v; top.bias = (uint32_t)v;
        } else if (cmd == "sp2") {
            int clear, sgn; in >> clear >> sgn;
            top.sp2_clear = clear; top.act_signed = sgn; top.sp2_en = 1;
            for (int i = 0; i < SP2_PIX * SP2_RED; ++i) { in >> v; put(top.sp2_act, i * 8, 8, v); }
            for (int i = 0; i < SP2_RED; ++i) { in >> v; put(top.sp2_w, i * 4, 4, v); }
            tick();
        } else if (cmd == "l4") {
            int clear, sgn; in >> clear >> sgn;
            top.l4_clear = clear; top.act_signed = sgn; top.l4_en = 1;
            for (int i = 0; i < SP2_PIX * SP2_RED; ++i) { in >> v; put(top.l4_act, i * 8, 8, v); }
            for (int i = 0; i < SP2_RED; ++i) { in >> v; put(top.l4_w, i * 4, 4, v); }
            tick();
        } else if (cmd == "dp" || cmd == "d1") {
            int clear, sgn, w8; in >> clear >> sgn >> w8;
            top.act_signed = sgn;
            if (cmd == "dp") {
                top.dp_clear = clear; top.dp_w8 = w8; top.dp_en = 1;
                for (int i = 0; i < 2 * DP_PIX * DP_RED; ++i) { in >> v; put(top.dp_act, i * 8, 8, v); }
                for (int i = 0; i < DP_RED; ++i) { in >> v; put(top.dp_w, i * 8, 8, v); }
            } else {
                top.d1_clear = clear; top.d1_w8 = w8; top.d1_en = 1;
                for (int i = 0; i < D1_PIX * D1_RED; ++i) { in >> v; put(top.d1_act, i * 8, 8, v); }
                for (int i = 0; i < D1_RED; ++i) { in >> v; put(top.d1_w, i * 8, 8, v); }
            }
            tick();
        } else if (cmd == "alu") {
            int op; in >> op;
            top.alu_op = op; top.alu_en = 1;
            for (int i = 0; i < LANES; ++i) { in >> v; put(top.alu_acc, i * 32, 32, v); }
            for (int i = 0; i < LANES; ++i) { in >> v; put(top.alu_operand, i * 32, 32, v); }
            for (int i = 0; i < LANES; ++i) { in >> v; put(top.alu_shift, i * 6, 6, v); }
            for (int i = 0; i < LANES; ++i) { if (!(in >> v)) v = 0; put(top.alu_acc_b, i * 32, 32, v); }
            tick();
            for (int i = 0; i < LANES; ++i) std::printf("%lld ", (long long)get(top.alu_res, i * 32, 32));
            std::printf("\n");
        } else if (cmd == "rd") {
            std::string unit; in >> unit;
            if (unit == "sp2") for (int i = 0; i < SP2_PIX; ++i) std::printf("%lld ", (long long)get(top.sp2_acc, i * 32, 32));
            if (unit == "l4") for (int i = 0; i < SP2_PIX; ++i) std::printf("%lld ", (long long)get(top.l4_acc, i * 32, 32));
            if (unit == "dp") for (int i = 0; i < 2 * DP_PIX; ++i) std::printf("%lld ", (long long)get(top.dp_acc, i * 32, 32));
            if (unit == "d1") for (int i = 0; i < D1_PIX; ++i) std::printf("%lld ", (long long)get(top.d1_acc, i * 32, 32));
            std::printf("\n");
        } else if (cmd == "dims") {
            std::printf("%d %d %d %d %d %d %d\n", SP2_PIX, SP2_RED, DP_PIX, DP_RED, D1_PIX, D1_RED, LANES);
        } else {
            std::fprintf(stderr, "rtl_tb: unknown command %s\n", cmd.c_str());
            return 2;
        }
    }
    top.final();
    return 0;
}
