// Fixed-4 multiply-accumulate array built from LUTs (no DSP slices): the LUT core of the
// `fixed4_lut_dsp` baseline, which runs Fixed-4 rows on the DSPs and on LUT multipliers at
// once. Same layout as sp2_array (sp2_pe.v): PIX x RED products per cycle, one weight row,
// an adder tree per pixel into its accumulator. Weight code: a two's-complement nibble.
module lut_mac_array #(
    parameter PIX  = 4,
    parameter RED  = 4,
    parameter ACCW = 32
) (
    input  wire                  clk,
    input  wire                  en,
    input  wire                  clear,
    input  wire                  act_signed,
    input  wire [PIX*RED*8-1:0]  act,
    input  wire [RED*4-1:0]      wcode,
    output reg  [PIX*ACCW-1:0]   acc
);
    integer i, j;
    reg signed [8:0]      a;
    reg signed [3:0]      w;
    reg signed [ACCW-1:0] sum;
    always @(posedge clk) begin
        if (en) begin
            for (i = 0; i < PIX; i = i + 1) begin
                sum = 0;
                for (j = 0; j < RED; j = j + 1) begin
                    a = {act_signed & act[(i*RED + j)*8 + 7], act[(i*RED + j)*8 +: 8]};
                    w = wcode[j*4 +: 4];
                    sum = sum + a * w;
                end
                acc[i*ACCW +: ACCW] <= clear ? sum : acc[i*ACCW +: ACCW] + sum;
            end
        end
    end
endmodule
