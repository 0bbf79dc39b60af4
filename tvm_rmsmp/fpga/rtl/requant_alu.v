// The accelerator's ALU on accumulator tiles (the integer epilogue of tvm_rmsmp.fpga.isa.Alu),
// LANES elements per cycle, registered result:
//   op 0 add_bias : acc + operand
//   op 1 mul_shift: (acc * operand + 2^(shift-1)) >>> shift   (requantization: integer
//                   multiply and rounding arithmetic shift; no rounding term when shift = 0)
//   op 2 shift    : (acc + 2^(shift-1)) >>> shift
//   op 3 relu     : max(acc, 0)
//   op 4 madd_shift: (acc * ma + acc_b * mb + 2^(shift-1)) >>> shift   (a residual add of two
//                   accumulator halves holding 8-bit codes: ma = operand[MW-1:0],
//                   mb = operand[2*MW-1:MW]; acc_b's low MW bits, signed: a code fits)
//   op 5 max      : max(acc, acc_b)   (a max-pooling: the controller feeds each window tap)
//   op 6 max4     : max of acc and acc_b as four packed signed bytes each (a max-pooling's row
//                   pass over codes stored four to a word: four codes a lane)
//   op 7 min      : min(acc, acc_b)   (ops 5 and 7 with the bounds on acc_b clamp a tile to a code
//                   range: the layer's codes a residual add fused into its epilogue reads)
// operand is ACCW bits per lane (a bias); the multiplier takes its low MW bits, signed (the
// requantization multiplier: 16 bits give 2^-15 relative precision, finer than int8 outputs).
// The result keeps ACCW bits (the simulator keeps the exact value; equal while it fits).
module requant_alu #(
    parameter LANES = 4,
    parameter ACCW  = 32,
    parameter MW    = 16,
    parameter SW    = 6
) (
    input  wire                  clk,
    input  wire                  en,
    input  wire [2:0]            op,     // 0..5, 7
    input  wire [LANES*ACCW-1:0] acc_in,
    input  wire [LANES*ACCW-1:0] acc_b,
    input  wire [LANES*ACCW-1:0] operand,
    input  wire [LANES*SW-1:0]   shift,
    output reg  [LANES*ACCW-1:0] res
);
    integer l, k;
    reg signed [ACCW-1:0]    a;
    reg signed [ACCW-1:0]    b;
    reg signed [MW-1:0]      m, mb, b16;
    reg        [SW-1:0]      sh;
    reg signed [ACCW+MW:0]   prod, rnd;
    always @(posedge clk) begin
        if (en) begin
            for (l = 0; l < LANES; l = l + 1) begin
                a  = acc_in[l*ACCW +: ACCW];
                b  = operand[l*ACCW +: ACCW];
                m  = operand[l*ACCW +: MW];
                mb = operand[l*ACCW + MW +: MW];
                b16 = acc_b[l*ACCW +: MW];
                sh = shift[l*SW +: SW];
                rnd = (sh == 0) ? 0 : ({{(ACCW+MW){1'b0}}, 1'b1} << (sh - 1));
                prod = (op == 3'd1) ? a * m : (op == 3'd4) ? a * m + b16 * mb : a;
                case (op)
                    3'd0: res[l*ACCW +: ACCW] <= a + b;
                    3'd3: res[l*ACCW +: ACCW] <= a[ACCW-1] ? {ACCW{1'b0}} : a;
                    3'd5, 3'd7: res[l*ACCW +: ACCW] <= (($signed(acc_b[l*ACCW +: ACCW]) > a) ^ op[1]) ? acc_b[l*ACCW +: ACCW] : a;
                    3'd6: for (k = 0; k < ACCW / 8; k = k + 1)
                              res[l*ACCW + k*8 +: 8] <= ($signed(acc_b[l*ACCW + k*8 +: 8]) > $signed(acc_in[l*ACCW + k*8 +: 8]))
                                                        ? acc_b[l*ACCW + k*8 +: 8] : acc_in[l*ACCW + k*8 +: 8];
                    default: res[l*ACCW +: ACCW] <= (prod + rnd) >>> sh;
                endcase
            end
        end
    end
endmodule
