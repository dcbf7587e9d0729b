//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

import (
	"encoding/binary"
	"net/netip"
	"syscall"
	"testing"
)

// encodeFlowMessage builds a dump reply carrying fl, as the kernel would.
func encodeFlowMessage(family uint8, fl Flow, flags uint16) []byte {
	tuple := func(t Tuple) []byte {
		ip, _ := ipAttrs(family, t.Src, t.Dst)
		proto := appendAttr(nil, ctaProtoNum, []byte{fl.Proto})
		proto = appendAttr(proto, ctaProtoSrcPort, be16(t.SrcPort))
		proto = appendAttr(proto, ctaProtoDstPort, be16(t.DstPort))
		return appendNested(appendNested(nil, ctaTupleIP, ip), ctaTupleProto, proto)
	}
	b := appendHeader(nil, ipctnlMsgCtNew, syscall.NLM_F_MULTI|flags, 7, family)
	b = appendNested(b, ctaTupleOrig, tuple(fl.Orig))
	b = appendNested(b, ctaTupleReply, tuple(fl.Reply))
	return finish(b, 0)
}

func doneMessage(flags uint16) []byte {
	b := binary.NativeEndian.AppendUint32(nil, 20)
	b = binary.NativeEndian.AppendUint16(b, syscall.NLMSG_DONE)
	b = binary.NativeEndian.AppendUint16(b, syscall.NLM_F_MULTI|flags)
	b = binary.NativeEndian.AppendUint32(b, 7)
	b = binary.NativeEndian.AppendUint32(b, 0)
	return binary.NativeEndian.AppendUint32(b, 0)
}

func TestEncodeDumpRequest(t *testing.T) {
	testCases := []struct {
		name      string
		filter    DumpFilter
		wantFlags uint32
		wantLen   int
		wantErr   bool
	}{
		{name: "proto only", filter: DumpFilter{Family: syscall.AF_INET, Proto: 17}, wantFlags: ctaFilterFlagProtoNum, wantLen: 56},
		{name: "NodePort", filter: DumpFilter{Family: syscall.AF_INET, Proto: 17, OrigDstPort: 30053}, wantFlags: ctaFilterFlagProtoNum | ctaFilterFlagProtoDst, wantLen: 64},
		{name: "ClusterIP:port", filter: DumpFilter{Family: syscall.AF_INET, Proto: 17, OrigDst: netip.MustParseAddr("198.18.0.10"), OrigDstPort: 53},
			wantFlags: ctaFilterFlagProtoNum | ctaFilterFlagProtoDst | ctaFilterFlagIPDst, wantLen: 76},
		{name: "IPv6 ClusterIP:port", filter: DumpFilter{Family: syscall.AF_INET6, Proto: 17, OrigDst: netip.MustParseAddr("2001:db8::a"), OrigDstPort: 53},
			wantFlags: ctaFilterFlagProtoNum | ctaFilterFlagProtoDst | ctaFilterFlagIPDst, wantLen: 88},
		{name: "family mismatch", filter: DumpFilter{Family: syscall.AF_INET6, Proto: 17, OrigDst: netip.MustParseAddr("198.18.0.10")}, wantErr: true},
		{name: "no protocol", filter: DumpFilter{Family: syscall.AF_INET}, wantErr: true},
	}
	for _, tc := range testCases {
		t.Run(tc.name, func(t *testing.T) {
			b, err := encodeDumpRequest(42, tc.filter)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("expected an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if len(b) != tc.wantLen || int(binary.NativeEndian.Uint32(b)) != len(b) {
				t.Errorf("length %d (header says %d), want %d", len(b), binary.NativeEndian.Uint32(b), tc.wantLen)
			}
			if typ := binary.NativeEndian.Uint16(b[4:]); typ != 1<<8|ipctnlMsgCtGet {
				t.Errorf("message type %#x", typ)
			}
			if fl := binary.NativeEndian.Uint16(b[6:]); fl != syscall.NLM_F_REQUEST|syscall.NLM_F_DUMP {
				t.Errorf("flags %#x", fl)
			}
			if b[16] != tc.filter.Family {
				t.Errorf("nfgen family %d", b[16])
			}
			attrs, err := parseAttrs(b[20:])
			if err != nil || len(attrs) != 2 || attrs[0].typ != ctaTupleOrig || attrs[1].typ != ctaFilter {
				t.Fatalf("attributes %+v, %v", attrs, err)
			}
			filter, _ := parseAttrs(attrs[1].data)
			if got := binary.NativeEndian.Uint32(filter[0].data); filter[0].typ != ctaFilterOrigFlags || got != tc.wantFlags {
				t.Errorf("orig flags %#x, want %#x", got, tc.wantFlags)
			}
			proto, tuple, err := parseTuple(attrs[0].data)
			if err != nil || proto != tc.filter.Proto || tuple.Dst != tc.filter.OrigDst || tuple.DstPort != tc.filter.OrigDstPort {
				t.Errorf("tuple %+v proto %d err %v", tuple, proto, err)
			}
		})
	}
}

func TestDecodeDumpBuffer(t *testing.T) {
	fl := Flow{Proto: 17,
		Orig:  Tuple{Src: netip.MustParseAddr("198.18.1.2"), Dst: netip.MustParseAddr("198.18.0.10"), SrcPort: 40000, DstPort: 53},
		Reply: Tuple{Src: netip.MustParseAddr("198.18.2.7"), Dst: netip.MustParseAddr("198.18.1.2"), SrcPort: 5353, DstPort: 40000}}
	fl6 := Flow{Proto: 17,
		Orig:  Tuple{Src: netip.MustParseAddr("2001:db8::1"), Dst: netip.MustParseAddr("2001:db8::a"), SrcPort: 1, DstPort: 2},
		Reply: Tuple{Src: netip.MustParseAddr("2001:db8::7"), Dst: netip.MustParseAddr("2001:db8::1"), SrcPort: 2, DstPort: 1}}
	testCases := []struct {
		name     string
		buf      []byte
		want     []Flow
		wantDone bool
		wantErr  error
	}{
		{name: "two flows then done", buf: append(append(encodeFlowMessage(syscall.AF_INET, fl, 0), encodeFlowMessage(syscall.AF_INET, fl, 0)...), doneMessage(0)...), want: []Flow{fl, fl}, wantDone: true},
		{name: "ipv6 flow, more to come", buf: encodeFlowMessage(syscall.AF_INET6, fl6, 0), want: []Flow{fl6}},
		{name: "interrupted dump", buf: append(encodeFlowMessage(syscall.AF_INET, fl, nlmFlagDumpInterrupted), doneMessage(nlmFlagDumpInterrupted)...), want: []Flow{fl}, wantDone: true, wantErr: errDumpInterrupted},
	}
	for _, tc := range testCases {
		t.Run(tc.name, func(t *testing.T) {
			var got []Flow
			done, err := decodeDumpBuffer(tc.buf, func(f Flow) { got = append(got, f) })
			if done != tc.wantDone || err != tc.wantErr {
				t.Fatalf("done=%v err=%v, want %v %v", done, err, tc.wantDone, tc.wantErr)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %d flows, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Errorf("flow %d: got %+v want %+v", i, got[i], tc.want[i])
				}
			}
		})
	}
	if _, err := decodeDumpBuffer([]byte{200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, func(Flow) {}); err == nil {
		t.Errorf("a truncated message must be an error")
	}
}
